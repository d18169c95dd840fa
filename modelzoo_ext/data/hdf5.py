"""The fine-tuning HDF5 layout ModelZoo's `GptHDF5MapDataProcessor` reads: write and read.

Each file holds a dataset `data`, int32 [N, 3, msl] (rows: input_ids, loss mask, labels),
gzip-compressed in chunks of one sample, and the attribute `n_examples` (as `cszoo
data_preprocess` writes it). A directory holds any number of `*.h5` files; readers take them in
sorted path order, then row order, as ModelZoo's `H5Reader` does. `data_params.json` beside them
records how the data was made (template version, tokenizer, split, counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.errors import UserError

DATASET = "data"
FEATURES = ("input_ids", "loss_mask", "labels")
PARAMS_FILE = "data_params.json"


def write_samples(path: str | Path, samples: np.ndarray) -> None:
    """Write one HDF5 file with `data` = samples (int32 [N, 3, msl]) and `n_examples` = N."""
    import h5py

    if samples.ndim != 3 or samples.shape[1] != 3:
        raise ValueError(f"samples must be [N, 3, msl], got {samples.shape}")
    with h5py.File(path, "w") as f:
        f.create_dataset(
            DATASET,
            data=samples.astype(np.int32),
            dtype="i4",
            chunks=(1, *samples.shape[1:]),
            compression="gzip",
            track_times=False,  # byte-identical files for identical input
        )
        f.attrs["n_examples"] = samples.shape[0]


def h5_files(data_dir: str | Path) -> list[Path]:
    """The `*.h5` files of a data directory in ModelZoo's order (sorted paths)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError("data directory not found", where=str(data_dir), fix="run `sparse-lora data prepare`")
    files = sorted(data_dir.glob("*.h5"))
    if not files:
        raise UserError("no *.h5 files in the data directory", where=str(data_dir))
    return files


class SampleDataset:
    """All samples of a data directory as one indexable sequence of int32 [3, msl] arrays.

    Files are opened lazily and read row by row, so a large dataset is never loaded whole.
    """

    def __init__(self, data_dir: str | Path) -> None:
        import h5py

        self.files = h5_files(data_dir)
        self.counts = []
        shapes = set()
        for path in self.files:
            with h5py.File(path, "r") as f:
                if DATASET not in f:
                    raise UserError(f"HDF5 file has no {DATASET!r} dataset", where=str(path))
                shape = f[DATASET].shape
                if len(shape) != 3 or shape[1] != 3:
                    raise UserError(
                        f"expected fine-tuning samples [N, 3, msl], got {shape}",
                        where=str(path),
                        fix="prepare the data with `sparse-lora data prepare` or `cszoo data_preprocess` "
                        "(mode: finetuning)",
                    )
                shapes.add(shape[2])
                self.counts.append(shape[0])
        if len(shapes) != 1:
            raise UserError(f"files disagree on the sequence length: {sorted(shapes)}", where=str(data_dir))
        self.max_seq_length = shapes.pop()
        self.boundaries = np.cumsum([0, *self.counts])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.boundaries[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        import h5py

        if not 0 <= index < len(self):
            raise IndexError(index)
        file_index = int(np.searchsorted(self.boundaries, index, side="right") - 1)
        if file_index not in self._handles:
            self._handles[file_index] = h5py.File(self.files[file_index], "r")
        return self._handles[file_index][DATASET][index - self.boundaries[file_index]]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def read_params(data_dir: str | Path) -> dict[str, Any]:
    """`data_params.json` of a prepared directory ({} when absent, e.g. ModelZoo-made data)."""
    path = Path(data_dir) / PARAMS_FILE
    return json.loads(path.read_text()) if path.exists() else {}
