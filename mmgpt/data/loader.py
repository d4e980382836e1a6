"""Deterministic, resumable batching over map-style datasets.

The order of every epoch is a pure function of ``(seed, epoch)``: a ``torch.randperm`` drawn
from its own ``torch.Generator``, never from the global RNG. The position in the stream is
``(epoch, index)`` — the number of batches of the current epoch already handed out — so a
resumed run jumps straight to the next batch by index arithmetic instead of replaying the
data.

Data parallelism: all ranks draw the same global permutation. The permutation is cut to a
whole number of *global* batches (``batch_size * world_size`` samples); the incomplete last
global batch is dropped, so every rank sees the same number of batches and no sample is seen
twice within an epoch. Rank ``r`` then takes the strided slice ``perm[r::world_size]`` and
batches it, so the ranks' batches are disjoint and together cover exactly the kept samples.
With ``shuffle=False, drop_last=False`` (evaluation) the tail is kept and the last batch of a
rank may be smaller (or absent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

__all__ = ["ResumableLoader", "epoch_permutation"]

# Mixes the epoch into the seed; a large odd constant keeps (seed, epoch) pairs apart.
_EPOCH_STRIDE = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(num_samples)``."""
    generator = torch.Generator()
    generator.manual_seed((int(seed) + int(epoch) * _EPOCH_STRIDE) & _SEED_MASK)
    return torch.randperm(num_samples, generator=generator)


class ResumableLoader:
    """Batches of a map-style dataset in a reproducible order, resumable mid-epoch.

    Iterating yields the *remaining* batches of the current epoch and then moves on to the
    next epoch (like one pass of a ``DataLoader``); :meth:`forever` chains epochs without end.
    ``state_dict()`` / ``load_state_dict()`` save and restore the position.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"ResumableLoader needs a map-style dataset (__len__ and __getitem__), "
                f"got {type(dataset).__name__}"
            )
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.collate_fn = collate_fn or default_collate
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.index = 0  # batches of the current epoch already handed out

    # -- order ----------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_samples // global_batch
        per_rank = len(range(self.rank, self.num_samples, self.world_size))
        return -(-per_rank // self.batch_size)

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """The sample indices of every batch this rank gets in ``epoch``."""
        n = self.num_samples
        order = epoch_permutation(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        if self.drop_last:
            order = order[: len(self) * self.batch_size * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    # -- iteration ------------------------------------------------------------------
    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Collated batches of ``epoch`` from batch ``start`` on; does not move the position."""
        batches = self.epoch_indices(epoch)[start:]
        if self.num_workers == 0:
            for indices in batches:
                yield self._collate(indices)
            return
        # Workers fetch in parallel. The loader gets its own generator so that creating it
        # does not draw from the global RNG (which would make resumed runs diverge).
        generator = torch.Generator()
        generator.manual_seed((self.seed + epoch) & _SEED_MASK)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        yield from loader

    def _collate(self, indices: Sequence[int]) -> Any:
        batch = self.collate_fn([self.dataset[i] for i in indices])
        if self.pin_memory and torch.cuda.is_available():
            batch = _pin(batch)
        return batch

    def __iter__(self) -> Iterator[Any]:
        """The remaining batches of the current epoch; the position advances as they go out."""
        epoch, start = self.epoch, self.index
        total = len(self)
        for batch in self.iter_epoch(epoch, start):
            self.index += 1
            if self.index >= total:
                self.epoch, self.index = epoch + 1, 0
            yield batch

    def forever(self) -> Iterator[Any]:
        """Batches across epochs without end (the training stream)."""
        if len(self) == 0:
            raise ValueError(
                f"dataset of {self.num_samples} samples gives no full batch of "
                f"{self.batch_size} x {self.world_size} rank(s); use a smaller batch_size "
                "or more data"
            )
        while True:
            if self.index >= len(self):  # e.g. a position saved at an epoch's end
                self.epoch, self.index = self.epoch + 1, 0
            yield from self

    # -- position -------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; refuses one saved for a different dataset size or batching."""
        for key in ("num_samples", "batch_size", "world_size", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data position: it was saved with {key}={state[key]}, "
                    f"this loader has {key}={getattr(self, key)}"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(f"invalid data position epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index


def _pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch
