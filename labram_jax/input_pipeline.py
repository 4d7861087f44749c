"""Grain input pipelines over the ArrayRecord shards written by data_prep.

Training order is a pure function of (seed, global sample position): position g of
the infinite stream belongs to step g // global_batch, and process p of P takes
positions [step * B + p * B/P, step * B + (p + 1) * B/P). Nothing about the order
needs saving beyond the step, so a run resumes exactly, even with another process
count. Several datasets mix with sampling weights in fixed-size blocks; each
dataset is reshuffled every epoch.

Every batch has one static shape, whatever montages and lengths it mixes:
``x [b, C, W, 200]`` float32, ``channel_ids [b, C]`` int32 (0 = padding),
``patch_mask [b, C, W]`` bool, ``label [b]`` int32, ``value [b]`` float32,
``valid [b]`` bool (False for padding samples of the last eval batch),
``position [b]`` int64 (the sample's global position, for provenance) and the input
guard's ``bad_records [b]`` int32, ``bad_dataset [b]`` int32 and ``bad_index [b]``
int64 (records skipped to make this sample, and the first of them; -1 if none).

Input guard: a record that does not decode, has another schema version or holds
non-finite values never reaches the model. In training the next record of the same
dataset takes its place (deterministically); in evaluation the sample is marked
invalid. :class:`InputGuard` reports each one with its shard and index.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags

from labram_jax import data_spec, records
from labram_jax.data_spec import Data, Source

_BLOCK = 1024  # positions per mixing block
_MAX_SUBSTITUTES = 64  # consecutive bad records tolerated before a dataset is declared corrupt
GUARD_FIELDS = ("position", "bad_records", "bad_dataset", "bad_index")  # host-only fields of a batch
log = logging.getLogger("labram_jax")


class GlobalOrder:
    """Deterministic infinite order: position -> (dataset, record) with weighted mixing."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool = True):
        if any(n <= 0 for n in sizes):
            raise ValueError(f"a dataset of the data spec has no records (sizes {list(sizes)}): re-run data_prep "
                             "for it or remove it from config.data.train")
        w = np.asarray(weights, np.float64) / np.sum(weights)
        counts = np.floor(w * _BLOCK).astype(np.int64)
        counts[np.argsort(-(w * _BLOCK - counts))[: _BLOCK - counts.sum()]] += 1  # largest remainder
        self.sizes, self.counts, self.seed, self.shuffle = list(sizes), counts, seed, shuffle

    @functools.lru_cache(maxsize=8)
    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        layout = np.repeat(np.arange(len(self.counts)), self.counts)
        if self.shuffle:
            layout = np.random.default_rng([self.seed, 1, block]).permutation(layout)
        rank = np.zeros_like(layout)
        for d in range(len(self.counts)):
            rank[layout == d] = np.arange(self.counts[d])
        return layout, rank

    @functools.lru_cache(maxsize=16)
    def _epoch(self, dataset: int, epoch: int) -> np.ndarray:
        n = self.sizes[dataset]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, 2, dataset, epoch]).permutation(n)

    def __call__(self, position: int) -> tuple[int, int]:
        block, offset = divmod(int(position), _BLOCK)
        layout, rank = self._layout(block)
        d = int(layout[offset])
        k = block * int(self.counts[d]) + int(rank[offset])  # k-th sample drawn from dataset d
        epoch, i = divmod(k, self.sizes[d])
        return d, int(self._epoch(d, epoch)[i])


class _Reader:
    """Random access to records of several datasets; opened lazily in each worker."""

    def __init__(self, sources: Sequence[Source]):
        self.sources = list(sources)
        self._handles = None

    def handles(self):
        if self._handles is None:
            self._handles = [grain.sources.ArrayRecordDataSource(list(s.shards)) for s in self.sources]
        return self._handles

    def sizes(self) -> list[int]:
        return [len(h) for h in self.handles()]

    def read(self, dataset: int, index: int) -> records.Record:
        """The record, or RecordError (undecodable, other schema, non-finite values)."""
        return records.decode(self.handles()[dataset][index])

    def locate(self, dataset: int, index: int) -> tuple[str, int]:
        """(shard file, index within it) of a dataset's record."""
        shards = self.sources[dataset].shards
        for shard in shards:
            n = len(grain.sources.ArrayRecordDataSource([shard]))
            if index < n:
                return shard, index
            index -= n
        raise IndexError(f"record beyond the end of {self.sources[dataset].name}")

    def __getstate__(self):  # worker processes reopen the files themselves
        return {"sources": self.sources, "_handles": None}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The static batch shape: channels x windows per sample."""

    channels: int
    windows: int

    def place(self, rec: records.Record) -> dict[str, np.ndarray]:
        n, a = rec.num_channels, rec.num_windows
        if n > self.channels or a > self.windows:
            raise ValueError(f"record {rec.recording}@{rec.start_s}s has {n} channels x {a} windows, more than "
                             f"the batch grid {self.channels} x {self.windows}: raise config.data.max_channels/"
                             "max_windows or re-run data_prep with shorter windows")
        x = np.zeros((self.channels, self.windows, records.PATCH), np.float32)
        x[:n, :a] = rec.signal
        ids = np.zeros((self.channels,), np.int32)
        ids[:n] = rec.channel_ids
        mask = np.zeros((self.channels, self.windows), bool)
        mask[:n, :a] = True
        return {"x": x, "channel_ids": ids, "patch_mask": mask, "label": np.int32(rec.label),
                "value": np.float32(rec.value), "valid": np.True_}

    def empty(self) -> dict[str, np.ndarray]:
        return {"x": np.zeros((self.channels, self.windows, records.PATCH), np.float32),
                "channel_ids": np.zeros((self.channels,), np.int32),
                "patch_mask": np.zeros((self.channels, self.windows), bool),
                "label": np.int32(-1), "value": np.float32(np.nan), "valid": np.False_}


@dataclasses.dataclass(frozen=True)
class _Position:
    """k-th local sample -> global position: step s, slot j of process p is s * B + p * b + j."""

    start_step: int
    local: int
    global_batch: int
    process_index: int

    def __call__(self, k: int) -> int:
        step, j = divmod(int(k), self.local)
        return (self.start_step + step) * self.global_batch + self.process_index * self.local + j


class _Concatenation:
    """Position -> (dataset, record) over datasets laid end to end (evaluation order)."""

    def __init__(self, offsets: np.ndarray):
        self.offsets = offsets

    def __call__(self, position: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.offsets, position, side="right") - 1)
        return d, int(position - self.offsets[d])


def _stack(items: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


class _Element:
    """position -> padded example (a picklable callable for Grain workers)."""

    def __init__(self, reader: _Reader, order: GlobalOrder | None, grid: Grid, limit: int | None = None):
        self.reader, self.order, self.grid, self.limit = reader, order, grid, limit

    def __call__(self, position: int) -> dict:
        position = int(position)
        bad, first_bad = 0, (-1, -1)
        if self.limit is not None and position >= self.limit:  # eval padding
            out = self.grid.empty()
        elif self.limit is not None:  # evaluation: a bad record becomes an invalid sample
            d, i = self.order(position)
            try:
                out = self.grid.place(self.reader.read(d, i))
            except records.RecordError:
                out, bad, first_bad = self.grid.empty(), 1, (d, i)
        else:  # training: the dataset's next good record takes a bad one's place
            d, i = self.order(position)
            size = self.reader.sizes()[d]
            for attempt in range(min(_MAX_SUBSTITUTES, size)):
                try:
                    out = self.grid.place(self.reader.read(d, (i + attempt) % size))
                    break
                except records.RecordError:
                    bad, first_bad = bad + 1, first_bad if bad else (d, (i + attempt) % size)
            else:
                shard, index = self.reader.locate(*first_bad)
                raise records.RecordError(f"{bad} consecutive bad records from {shard} index {index} on: the "
                                          "dataset is damaged; re-run data_prep for it")
        out["position"] = np.int64(position)
        out["bad_records"] = np.int32(bad)
        out["bad_dataset"] = np.int32(first_bad[0])
        out["bad_index"] = np.int64(first_bad[1])
        return out


def _iterate(positions: grain.MapDataset, element: _Element, batch: int, num_workers: int) -> Iterator[dict]:
    ds = positions.map(element).batch(batch, drop_remainder=True, batch_fn=_stack)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain reads absl flags; outside absl.app (notebooks, scripts) use defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def train_iterator(spec: Data, grid: Grid, global_batch: int, seed: int, start_step: int = 0,
                   process_index: int = 0, process_count: int = 1, num_workers: int = 0) -> Iterator[dict]:
    """This process's slices of the global training batches, from ``start_step`` on (infinite)."""
    if global_batch % process_count:
        raise ValueError(f"config.data.batch_size {global_batch} is not divisible by the {process_count} "
                         "processes: make it a multiple of the process count")
    local = global_batch // process_count
    sources = data_spec.resolve(spec, "train")
    reader = _Reader(sources)
    order = GlobalOrder(reader.sizes(), [s.weight for s in sources], seed)
    total_steps = 2**40 // global_batch  # "infinite"
    positions = grain.MapDataset.range(0, (total_steps - start_step) * local).map(
        _Position(start_step, local, global_batch, process_index))
    return _iterate(positions, _Element(reader, order, grid), local, num_workers)


def iter_records(spec: Data, split: str) -> Iterator[records.Record]:
    """Every record of a split, dataset by dataset in file order (for host-side analyses of
    small data; undecodable records raise RecordError)."""
    reader = _Reader(data_spec.resolve(spec, split))
    for d, size in enumerate(reader.sizes()):
        for i in range(size):
            yield reader.read(d, i)


def count_records(spec: Data, split: str = "train") -> int:
    return sum(_Reader(data_spec.resolve(spec, split)).sizes())


def provenance_at(spec: Data, split: str, positions: Sequence[int], *fields: str) -> list[list[str]]:
    """For each of ``fields`` (``recording``, ``subject`` ...), the ``dataset/<value>`` of every
    evaluation position of :func:`eval_batches`; one pass that re-reads the records."""
    reader = _Reader(data_spec.resolve(spec, split))
    order = _Concatenation(np.cumsum([0] + reader.sizes()))
    out = [[] for _ in fields]
    for position in positions:
        d, i = order(int(position))
        record = reader.read(d, i)
        for column, field in zip(out, fields):
            column.append(f"{reader.sources[d].name}/{getattr(record, field)}")
    return out


def eval_batches(spec: Data, grid: Grid, global_batch: int, split: str = "val", process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """One pass over a split in file order; the last batch is padded with invalid samples."""
    local = global_batch // process_count
    sources = data_spec.resolve(spec, split)
    reader = _Reader(sources)
    sizes = reader.sizes()
    offsets = np.cumsum([0] + sizes)
    total = int(offsets[-1])
    steps = -(-total // global_batch)

    positions = grain.MapDataset.range(0, steps * local).map(_Position(0, local, global_batch, process_index))
    element = _Element(reader, _Concatenation(offsets), grid, limit=total)
    return _iterate(positions, element, local, 0)


class InputGuard:
    """Takes the guard fields off local batches and reports every skipped record once."""

    def __init__(self, spec: Data, split: str):
        self.spec, self.split = spec, split
        self.count = 0
        self._reader = None

    def take(self, batch: dict) -> dict:
        """Pops the host-only fields of ``batch`` (in place); returns them."""
        fields = {k: batch.pop(k) for k in GUARD_FIELDS}
        for n, d, i in zip(fields["bad_records"], fields["bad_dataset"], fields["bad_index"]):
            if n > 0:
                self.count += int(n)
                self._report(int(n), int(d), int(i))
        return fields

    def _report(self, n: int, dataset: int, index: int) -> None:
        if self._reader is None:
            self._reader = _Reader(data_spec.resolve(self.spec, self.split))
        shard, local = self._reader.locate(dataset, index)
        try:
            self._reader.read(dataset, index)
            reason = "unreadable"
        except records.RecordError as err:
            reason = str(err)
        more = f" (and {n - 1} following)" if n > 1 else ""
        log.warning("input guard: skipped record %d of %s%s: %s [%d skipped so far]", local, shard, more, reason,
                    self.count)


def batch_provenance(spec: Data, seed: int, global_batch: int, step: int) -> list[dict]:
    """Where the samples of training step ``step`` (0-based) came from: dataset, recording,
    subject, start (s) and peak amplitude (uV) of each, re-derived from the global order."""
    sources = data_spec.resolve(spec, "train")
    reader = _Reader(sources)
    order = GlobalOrder(reader.sizes(), [s.weight for s in sources], seed)
    out = []
    for position in range(step * global_batch, (step + 1) * global_batch):
        d, i = order(position)
        shard, index = reader.locate(d, i)
        entry = {"position": position, "shard": shard, "index": index}
        try:
            rec = reader.read(d, i)
            entry.update(dataset=rec.dataset, recording=rec.recording, subject=rec.subject, start_s=rec.start_s,
                         peak_uv=float(np.abs(rec.signal).max(initial=0.0)) * 100.0)
        except records.RecordError as err:
            entry["error"] = str(err)
        out.append(entry)
    return out

