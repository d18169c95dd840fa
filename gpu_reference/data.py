"""Batches from ModelZoo's fine-tuning HDF5 in the order `GptHDF5MapDataProcessor` yields them.

ModelZoo's `cstorch.utils.data.DistributedSampler` (shard over one system) reduces to:

    epoch e: order = randperm(N, generator seeded with shuffle_seed + e)   if shuffle
                     0, 1, ..., N-1                                        otherwise
    batches: consecutive `batch_size` indices; with drop_last (the default) the samples left
             over at the end of an epoch start the next epoch's first batch (no data is lost);
             without it the short last batch is yielded.

`global_batches(...)` reproduces that stream of index lists from any optimizer step (resume
skips whole batches, recomputing the permutations, never reading skipped samples). Under DDP
each rank takes its contiguous slice of every global batch, so the union over ranks is the
same global batch a single process sees.

`sequence_stats(data_dir)` reads only the loss masks: the longest sample after trimming, for the
memory plan (`gpu_reference.memory_plan`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from modelzoo_ext.data.hdf5 import SampleDataset


@dataclass(frozen=True)
class SequenceStats:
    """The sequences a run will see: the longest after trimming, and the most loss tokens of one."""

    longest: int
    most_loss_tokens: int
    source: str  # where the numbers come from (prepared data, or the configured worst case)


def epoch_order(num_samples: int, epoch: int, shuffle: bool, seed: int) -> list[int]:
    """Sample indices of one epoch (ModelZoo's `ShuffleSampler`)."""
    if not shuffle:
        return list(range(num_samples))
    gen = torch.Generator()
    gen.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=gen).tolist()


def global_batches(
    num_samples: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = True
) -> Iterator[list[int]]:
    """The endless stream of global batches (lists of sample indices), epoch after epoch."""
    leftover: list[int] = []
    epoch = 0
    while True:
        batch = list(leftover) if drop_last else []
        for index in epoch_order(num_samples, epoch, shuffle, seed):
            batch.append(index)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if drop_last:
            leftover = batch
        elif batch:
            yield batch
        epoch += 1


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (the batch must divide evenly)."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def collate(dataset: SampleDataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """Samples -> {input_ids, attention_mask (the loss mask, ModelZoo's name), labels}, int32 [B, msl]."""
    stacked = np.stack([dataset[i] for i in indices]).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(stacked[:, 0].copy()),
        "attention_mask": torch.from_numpy(stacked[:, 1].copy()),
        "labels": torch.from_numpy(stacked[:, 2].copy()),
    }


def sequence_stats(data_dir: str) -> SequenceStats:
    """The longest sample of a prepared directory after trimming (its last loss token + 1) and the
    most loss tokens of one sample: what a micro-batch of this data can hold at most."""
    import h5py

    from modelzoo_ext.data.hdf5 import DATASET

    dataset = SampleDataset(data_dir)
    longest = most_loss = 0
    for path in dataset.files:
        with h5py.File(path, "r") as f:
            data = f[DATASET]
            for start in range(0, data.shape[0], 512):
                loss_mask = torch.from_numpy(data[start : start + 512, 1, :].astype(np.int32))
                positions = torch.arange(1, loss_mask.shape[1] + 1)
                longest = max(longest, int((loss_mask.ne(0) * positions).amax()))
                most_loss = max(most_loss, int(loss_mask.ne(0).sum(dim=1).amax()))
    source = (
        f"prepared data {data_dir}: {len(dataset)} samples, longest {longest} tokens after trimming "
        f"(of {dataset.max_seq_length}), at most {most_loss} loss tokens per sample"
    )
    return SequenceStats(longest=max(1, longest), most_loss_tokens=max(1, most_loss), source=source)
