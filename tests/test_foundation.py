"""The package's foundation: mask file format round trip and tamper detection, the HF reader, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import MaskFile, load_masks, pack_bits, save_masks, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (64, 17)])
def test_pack_unpack_round_trip(shape):
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5).numpy()
    packed = pack_bits(mask)
    assert packed.dtype == np.uint8 and packed.size == (mask.size + 7) // 8
    assert np.array_equal(unpack_bits(packed, shape), mask)


def test_save_load_round_trip_and_size(tmp_path):
    gen = torch.Generator().manual_seed(1)
    masks = {f"layer{i}.weight": torch.rand(128, 256, generator=gen) > 0.3 for i in range(3)}
    meta = save_masks(tmp_path / "m.safetensors", masks, {"method": "random", "seed": 1})
    loaded, meta2 = load_masks(tmp_path / "m.safetensors")
    assert meta == meta2
    assert loaded.keys() == masks.keys()
    for key in masks:
        assert torch.equal(loaded[key], masks[key])
        assert meta["tensors"][key]["kept"] == int(masks[key].sum())
    numel = 3 * 128 * 256
    assert (tmp_path / "m.safetensors").stat().st_size <= 1.02 * numel / 8 + 4096


def test_every_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks(path, {"w": torch.tensor([[True, False, True], [False, False, True]])}, {"method": "x"})
    data = path.read_bytes()
    undetected = []
    for offset in range(len(data)):
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x01
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(bytes(corrupt))
        try:
            load_masks(bad)
        except UserError:
            continue
        undetected.append(offset)
    # JSON whitespace padding at the end of the safetensors header is the only slack.
    header_len = int.from_bytes(data[:8], "little")
    assert all(data[o : o + 1] == b" " and o < 8 + header_len for o in undetected), undetected


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks(path, {"w": torch.ones(16, 16, dtype=torch.bool)})
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated or corrupt"):
        MaskFile(path)


def test_hf_checkpoint_reads_single_and_sharded(tiny_llama_dir, tiny_llama_sharded_dir):
    single = HFCheckpoint(tiny_llama_dir)
    sharded = HFCheckpoint(tiny_llama_sharded_dir)
    assert single.keys() == sharded.keys()
    assert len(sharded.shards()) > 1
    for key, tensor in sharded.iter_tensors():
        assert torch.equal(tensor, single.get(key))
        assert tuple(tensor.shape) == single.shape(key)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="pickle"):
        HFCheckpoint(tmp_path)


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "modelzoo_ext.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "sparse-lora" in out.stdout
