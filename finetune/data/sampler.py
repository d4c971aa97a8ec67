"""A seeded distributed sampler that can resume in the middle of an epoch.

Each epoch's order comes from `seed + epoch` alone (never the global RNG), so a resumed
run rebuilds the same permutation and skips what it already trained on: the rest of the
epoch is exactly what the uninterrupted run would have seen.
"""

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Indices of this rank's shard of a `dataset_len`-sample dataset.

    Ranks take interleaved shards of one shared permutation and all get the same number of
    samples: with `drop_last` the tail that does not divide evenly is left out, otherwise
    the first indices of the permutation are repeated to fill the last round.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is invalid for world_size {world_size}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = dataset_len // world_size
        else:
            self.num_samples = -(-dataset_len // world_size)
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order; skip the first `start_index` samples of this shard."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside this rank's {self.num_samples} samples")
        self.epoch = epoch
        self.start_index = start_index

    def shard(self) -> list[int]:
        """This rank's whole shard for the current epoch, before skipping."""
        return self._shard().tolist()

    def _shard(self) -> torch.Tensor:
        # A tensor, not a list: a list of Python ints costs ~40 bytes a sample, 160 MB at 4M samples.
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        total = self.num_samples * self.world_size
        while len(order) < total:  # more ranks than samples can need several repeats
            order = torch.cat([order, order[: total - len(order)]])
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return (int(index) for index in self._shard()[self.start_index :].numpy())

    def __len__(self) -> int:
        return self.num_samples - self.start_index
