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

**Length grouping.** ``length_grouping=G`` cuts each epoch's batches (as above) into
windows of ``G`` and, within a window, sorts its samples by their token length, cuts them
into batches again and hands those out in a random order of their own (from ``(seed, epoch,
window)``): batches of samples of similar length, padded less. The collate function must
encode samples one by one (``encode_sample``; ``collate`` of the encoded, as
:class:`~mmgpt.processor.MultimodalProcessor` does), so each sample is read and encoded
once. The position stays ``(epoch, index)``: a resumed run re-encodes the current window and
skips the batches already handed out.

**Streams.** A :class:`StreamDataset` (tar shards, parquet read row group by row group) has
no random access: ``ResumableLoader(stream, ...)`` is a :class:`StreamingLoader`, which
reads its shards one after the other. An epoch's shard order is a function of ``(seed,
epoch)``; samples then pass through a shuffle buffer (``dataset.shuffle_buffer`` entries),
from which a counter-based generator of ``(seed, epoch, draws)`` picks the next one. The
position — epoch, batches handed out, the shard being read and where in it, the buffered
entries (as references, read again on resume) and the number of draws — is the loader's
``state_dict()``, so a resumed run reads exactly the samples an uninterrupted one would.
Ranks read the same stream and take the same strided slots of each global batch as above;
each decodes only its own samples' images.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from mmgpt.data.errors import DataError
from mmgpt.data.images import ImageLoadError
from mmgpt.data.records import Problem, summarize_problems

__all__ = [
    "DEFAULT_SHUFFLE_BUFFER",
    "ResumableLoader",
    "StreamDataset",
    "StreamItem",
    "StreamingLoader",
    "epoch_permutation",
]

# Mixes the epoch into the seed; a large odd constant keeps (seed, epoch) pairs apart.
_EPOCH_STRIDE = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1
_WINDOW_STRIDE = 0xBF58476D1CE4E5B9  # another odd constant, for length-grouping windows


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(num_samples)``."""
    generator = torch.Generator()
    generator.manual_seed((int(seed) + int(epoch) * _EPOCH_STRIDE) & _SEED_MASK)
    return torch.randperm(num_samples, generator=generator)


def _check_batching(batch_size: Any, rank: Any, world_size: Any, num_workers: Any) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers: expected >= 0, got {num_workers}")


class ResumableLoader:
    """Batches of a map-style dataset in a reproducible order, resumable mid-epoch.

    Iterating yields the *remaining* batches of the current epoch and then moves on to the
    next epoch (like one pass of a ``DataLoader``); :meth:`forever` chains epochs without end.
    ``state_dict()`` / ``load_state_dict()`` save and restore the position.

    Over a :class:`StreamDataset` the loader is a :class:`StreamingLoader` (same arguments).
    """

    def __new__(cls, dataset: Any = None, *args: Any, **kwargs: Any) -> ResumableLoader:
        if cls is ResumableLoader and isinstance(dataset, StreamDataset):
            return super().__new__(StreamingLoader)
        return super().__new__(cls)

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
        length_grouping: int = 0,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"ResumableLoader needs a map-style dataset (__len__ and __getitem__) or a "
                f"StreamDataset, got {type(dataset).__name__}"
            )
        _check_batching(batch_size, rank, world_size, num_workers)
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
        self.length_grouping = _check_length_grouping(length_grouping, self.collate_fn)
        if self.length_grouping and num_workers:
            raise ValueError(
                "length_grouping reads and encodes a window's samples in the training process "
                f"to sort them; it needs num_workers=0, got {num_workers}"
            )
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
        if self.length_grouping:
            yield from self._grouped_epoch(epoch, start)
            return
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
        return self._finish(self.collate_fn([self.dataset[i] for i in indices]))

    def _finish(self, batch: Any) -> Any:
        if self.pin_memory and torch.cuda.is_available():
            batch = _pin(batch)
        return batch

    def _grouped_epoch(self, epoch: int, start: int) -> Iterator[Any]:
        """``iter_epoch`` with length grouping (module docstring)."""
        batches = self.epoch_indices(epoch)
        size = self.length_grouping
        for first in range(start - start % size, len(batches), size):
            window = batches[first : first + size]
            indices = [i for batch in window for i in batch]
            encoded = [self.collate_fn.encode_sample(self.dataset[i], index=i) for i in indices]
            # stable: equal lengths keep the shuffled order
            ranked = sorted(range(len(indices)), key=lambda k: len(encoded[k].input_ids))
            grouped, at = [], 0
            for batch in window:  # the same batch sizes, now of neighbouring lengths
                grouped.append(ranked[at : at + len(batch)])
                at += len(batch)
            generator = torch.Generator()
            generator.manual_seed(_window_seed(self.seed, epoch, first))
            order = torch.randperm(len(grouped), generator=generator).tolist()
            for k in order[max(0, start - first) :]:
                yield self._finish(self.collate_fn.collate([encoded[j] for j in grouped[k]]))

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


def _check_length_grouping(value: Any, collate_fn: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"length_grouping: expected an integer >= 0 (batches a window), got {value!r}"
        )
    if value and not (
        callable(getattr(collate_fn, "encode_sample", None))
        and callable(getattr(collate_fn, "collate", None))
    ):
        raise ValueError(
            "length_grouping sorts samples by their encoded length: the collate function must "
            "encode them one by one (encode_sample, then collate, as the multimodal processor "
            f"does); {type(collate_fn).__name__} does not"
        )
    return value


def _window_seed(seed: int, epoch: int, first_batch: int) -> int:
    """The seed of a length-grouping window's batch order, apart from the epoch's own."""
    mixed = int(seed) + int(epoch) * _EPOCH_STRIDE + (int(first_batch) + 1) * _WINDOW_STRIDE
    return mixed & _SEED_MASK


def _pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch


# -- streams --------------------------------------------------------------------------------
# Entries a StreamingLoader keeps in its shuffle buffer by default; a dataset's own
# ``shuffle_buffer`` replaces it.
DEFAULT_SHUFFLE_BUFFER = 1000
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_draw(seed: int, epoch: int, draw: int) -> int:
    """The ``draw``-th number of the shuffle buffer's generator in ``epoch``: a counter-based
    generator, so its whole state is the number of draws."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ draw)


@dataclass
class StreamItem:
    """One entry read from a shard of a :class:`StreamDataset`.

    ``ref`` reads it again (``dataset.read_item(shard, ref)``) and ``cursor`` is where reading
    the shard continues after it; both are JSON values (they go into checkpoints). ``sample``
    is what ``dataset.decode`` turns into a sample (its images not loaded yet); an unusable
    entry has a ``problem`` instead. ``file``, ``line`` and ``id`` locate it for messages.
    """

    shard: int
    ref: Any
    cursor: Any
    file: str
    line: int | None
    id: str | None = None
    sample: Any = None
    problem: Problem | None = None

    def fail(self, reason: str, message: str) -> Problem:
        return Problem(self.file, self.line, reason, message, self.id)


class StreamDataset(IterableDataset):
    """A dataset read in order, shard by shard, without random access.

    Formats implement ``shards`` (names, in order), ``read_shard(shard, cursor)`` (the
    :class:`StreamItem` s from ``cursor`` on; ``None``: the start), ``read_item(shard, ref)``
    and ``decode(item)`` (the sample, images loaded; ``ImageLoadError`` when one cannot be).

    Iterating yields the samples of every shard in order (unusable entries skipped);
    :class:`StreamingLoader` shuffles and batches them resumably. ``problems`` and ``skipped``
    collect what was skipped; ``strict=True`` raises ``DataError`` on the first problem.
    """

    format_name = "stream"
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    source: str = ""
    strict: bool = False
    shards: Sequence[str] = ()

    def read_shard(self, shard: int, cursor: Any = None) -> Iterator[StreamItem]:
        raise NotImplementedError

    def read_item(self, shard: int, ref: Any) -> StreamItem:
        raise NotImplementedError

    def decode(self, item: StreamItem) -> Any:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the shards (a resumed position must be for the same data)."""
        return hashlib.sha256(json.dumps(list(self.shards)).encode("utf-8")).hexdigest()[:16]

    def report(self, problem: Problem) -> None:
        """Count a skipped entry once, however many epochs meet it (the first of each reason
        is warned about); under ``strict`` raise ``DataError`` instead."""
        if not hasattr(self, "problems"):
            self.problems: list[Problem] = []
            self.skipped: dict[str, int] = {}
        if self.strict:
            raise DataError(
                str(problem), file=problem.file, line=problem.line, reason=problem.reason
            )
        seen = self.__dict__.setdefault("_reported", set())
        if problem in seen:
            return
        seen.add(problem)
        self.problems.append(problem)
        first = problem.reason not in self.skipped
        self.skipped[problem.reason] = self.skipped.get(problem.reason, 0) + 1
        if first:
            warnings.warn(
                f"{self.format_name} {self.source}: skipping an unusable entry, {problem} "
                "(later entries with this problem are counted in dataset.skipped, not warned "
                "about)",
                RuntimeWarning,
                stacklevel=3,
            )

    def usable_items(self) -> Iterator[StreamItem]:
        """The usable entries of every shard, in order; problems are reported."""
        for shard in range(len(self.shards)):
            for item in self.read_shard(shard):
                if item.problem is not None:
                    self.report(item.problem)
                else:
                    yield item

    def __iter__(self) -> Iterator[Any]:
        for item in self.usable_items():
            try:
                yield self.decode(item)
            except ImageLoadError as exc:
                self.report(item.fail(exc.reason or "corrupt_image", str(exc)))

    def iter_conversations(self) -> Iterator[Any]:
        """Each usable entry's conversation, in order, without loading images (for training
        a tokenizer on the text)."""
        for item in self.usable_items():
            yield item.sample.turns

    def problem_summary(self) -> str:
        return summarize_problems(getattr(self, "problems", []))


class _ShuffledStream:
    """The entries of a stream, epoch by epoch: shards in a seeded order, through a shuffle
    buffer; everything needed to continue is in :meth:`state`."""

    def __init__(self, dataset: StreamDataset, seed: int, shuffle: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        size = int(dataset.shuffle_buffer) if shuffle else 1
        if size < 1:
            raise ValueError(f"shuffle_buffer: expected a positive integer, got {size}")
        self.buffer_size = size
        self.start(0)

    def start(self, epoch: int) -> None:
        n = len(self.dataset.shards)
        self.epoch = epoch
        self.order = (
            epoch_permutation(n, self.seed, epoch).tolist() if self.shuffle else list(range(n))
        )
        self.position = 0  # index into order of the shard being read
        self.cursor: Any = None  # where reading it continues
        self.buffer: list[StreamItem] = []
        self.draws = 0
        self._source: Iterator[StreamItem] | None = None

    def _items(self) -> Iterator[StreamItem]:
        while self.position < len(self.order):
            for item in self.dataset.read_shard(self.order[self.position], self.cursor):
                self.cursor = item.cursor
                if item.problem is not None:
                    self.dataset.report(item.problem)
                    continue
                yield item
            self.position, self.cursor = self.position + 1, None

    def next(self) -> StreamItem | None:
        """The next entry of this epoch, or ``None`` when the epoch is over."""
        if self._source is None:
            self._source = self._items()
        while len(self.buffer) < self.buffer_size:
            item = next(self._source, None)
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        j = stream_draw(self.seed, self.epoch, self.draws) % len(self.buffer)
        self.draws += 1
        chosen = self.buffer[j]
        refill = next(self._source, None)
        if refill is None:
            self.buffer[j] = self.buffer[-1]
            self.buffer.pop()
        else:
            self.buffer[j] = refill
        return chosen

    def state(self) -> dict[str, Any]:
        return {
            "shard_position": self.position,
            "shard": self.order[self.position] if self.position < len(self.order) else None,
            "cursor": self.cursor,
            "buffer": [[item.shard, item.ref] for item in self.buffer],
            "draws": self.draws,
        }

    def restore(self, epoch: int, state: dict[str, Any]) -> None:
        self.start(epoch)
        position = int(state["shard_position"])
        if not 0 <= position <= len(self.order):
            raise ValueError(f"invalid stream position: shard_position={position}")
        self.position, self.cursor = position, state["cursor"]
        self.draws = int(state["draws"])
        self.buffer = [self.dataset.read_item(int(shard), ref) for shard, ref in state["buffer"]]


class StreamingLoader(ResumableLoader):
    """Batches of a :class:`StreamDataset`, resumable at any batch (see the module docstring).

    The arguments are :class:`ResumableLoader`'s. An epoch ends when every shard has been
    read; with ``drop_last`` its incomplete last global batch is dropped. ``num_workers``
    threads decode the images of a batch (the order never depends on them). An image that
    fails to load is replaced by the next loadable sample of the same global batch (warned
    about once per reason; ``dataset.strict`` raises instead). The size of a stream is not
    known: ``len()`` and held-out evaluation are not available.
    """

    def __init__(
        self,
        dataset: StreamDataset,
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
        length_grouping: int = 0,
    ) -> None:
        if not isinstance(dataset, StreamDataset):
            raise TypeError(f"StreamingLoader needs a StreamDataset, got {type(dataset).__name__}")
        if length_grouping:
            raise ValueError(
                f"{dataset.source}: length_grouping needs a dataset with random access; a "
                "streamed one is read in its shuffle buffer's order"
            )
        _check_batching(batch_size, rank, world_size, num_workers)
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
        self.stream = _ShuffledStream(dataset, self.seed, shuffle)
        self.epoch = 0
        self.index = 0  # global batches of the current epoch handed out
        self.samples = 0  # entries of the current epoch consumed (index x global batch)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def num_samples(self) -> int:
        raise TypeError(f"{self.dataset.source}: a streamed dataset has no known size")

    def __len__(self) -> int:
        raise TypeError(f"{self.dataset.source}: a streamed dataset has no known number of batches")

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        raise TypeError("a streamed dataset has no sample indices")

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        raise TypeError(
            f"{self.dataset.source}: a streamed dataset is read from its saved position only "
            "(iterate the loader)"
        )

    # -- iteration ------------------------------------------------------------------
    def _next_epoch(self) -> None:
        self.epoch, self.index, self.samples = self.epoch + 1, 0, 0
        self.stream.start(self.epoch)

    def __iter__(self) -> Iterator[Any]:
        """The remaining batches of the current epoch; the position advances as they go out."""
        global_batch = self.batch_size * self.world_size
        while True:
            chunk: list[StreamItem] = []
            while len(chunk) < global_batch:
                item = self.stream.next()
                if item is None:
                    break
                chunk.append(item)
            if len(chunk) < global_batch:
                mine = chunk[self.rank :: self.world_size]
                last = None if self.drop_last or not mine else self._batch(chunk, self.rank)
                self._next_epoch()
                if last is not None:
                    yield last
                return
            self.index += 1
            self.samples += global_batch
            yield self._batch(chunk, self.rank)

    def forever(self) -> Iterator[Any]:
        """Batches across epochs without end (the training stream)."""
        while True:
            fresh = self.samples == 0 and self.stream.draws == 0  # a whole epoch ahead
            produced = False
            for batch in self:
                produced = True
                yield batch
            if fresh and not produced:
                raise ValueError(
                    f"{self.dataset.source}: an epoch of the stream gives no full batch of "
                    f"{self.batch_size} x {self.world_size} rank(s) "
                    f"({self.dataset.problem_summary() or 'no problems found'}); use a "
                    "smaller batch_size or more data"
                )

    def _batch(self, chunk: list[StreamItem], rank: int) -> Any:
        slots = list(range(rank, len(chunk), self.world_size))
        if self.num_workers and len(slots) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="mmgpt-data")
            samples = list(self._pool.map(lambda slot: self._decode(chunk, slot), slots))
        else:
            samples = [self._decode(chunk, slot) for slot in slots]
        batch = self.collate_fn(samples)
        if self.pin_memory and torch.cuda.is_available():
            batch = _pin(batch)
        return batch

    def _decode(self, chunk: list[StreamItem], slot: int) -> Any:
        """The sample of ``chunk[slot]``, or of the next entry of the chunk whose images load."""
        for step in range(len(chunk)):
            item = chunk[(slot + step) % len(chunk)]
            try:
                return self.dataset.decode(item)
            except ImageLoadError as exc:
                self.dataset.report(item.fail(exc.reason or "corrupt_image", str(exc)))
        raise DataError(
            f"{self.dataset.format_name} {self.dataset.source}: none of the {len(chunk)} samples "
            f"of a batch has loadable images ({self.dataset.problem_summary()})"
        )

    # -- position -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "epoch": self.epoch,
            "index": self.index,
            "samples": self.samples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.stream.buffer_size,
            "num_shards": len(self.dataset.shards),
            "fingerprint": self.dataset.fingerprint(),
            "stream": self.stream.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; refuses one saved for other shards or another shuffle."""
        if state.get("kind") != "stream":
            raise ValueError(
                "cannot resume the data position: it was saved for a map-style dataset, "
                f"this run reads a stream ({self.dataset.source})"
            )
        mine = {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.stream.buffer_size,
            "num_shards": len(self.dataset.shards),
            "fingerprint": self.dataset.fingerprint(),
        }
        for key, value in mine.items():
            if state.get(key) != value:
                what = "the shards changed" if key in ("num_shards", "fingerprint") else key
                raise ValueError(
                    f"cannot resume the data position of {self.dataset.source}: {what} "
                    f"(saved {key}={state.get(key)!r}, now {value!r})"
                )
        epoch, samples = int(state["epoch"]), int(state["samples"])
        global_batch = self.batch_size * self.world_size
        if epoch < 0 or samples < 0 or samples % global_batch:
            raise ValueError(
                f"cannot resume the data position: {samples} samples of epoch {epoch} were "
                f"consumed, not a multiple of {self.world_size} rank(s) x batch_size "
                f"{self.batch_size}"
            )
        self.stream.restore(epoch, state["stream"])
        self.epoch, self.samples, self.index = epoch, samples, samples // global_batch
