"""Records -> encoded samples in `torch.utils.data.DataLoader` workers, with an exact, resumable position.

`EncodedRecords` is an `IterableDataset` over one rank's shard of a source. With `num_workers` workers, worker `w`
takes every `num_workers`-th record of that shard (``source.shard(w, num_workers)``; WebDataset shards are split by
whole tar file when there are enough of them), and decodes, resizes and tokenizes it. Every record read gives exactly
one `RecordResult` (a sample, a bad record, or a record already known to be too long), so the consumer keeps the
bad-record accounting and its limit per record, in one process. The loader is torchdata's `StatefulDataLoader`: it
delivers the workers' results round-robin in a fixed order and its `state_dict()` is the position after the last
result handed out (every worker's source cursor, pass and over-long records), however far the workers have read ahead;
a resumed loader continues with exactly the next result.

The order of records is the source order whatever `num_workers` is, within a pass whose length the workers divide;
across pass ends it depends on `num_workers`. So `load_state_dict` (exact: the very next result) needs the number of
workers (and processes) the state was saved with; with another number, `EncodedRecords.continue_from` takes the
states of every worker of every rank of the earlier run and continues with the records none of them had read in
their passes (`finevit_vl.data.sources.RecordSource.continue_from`), in another order.
"""

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data import BadRecordError
from ..data.collator import EncodedSample, RecordOutsideDirection, SampleEncoder


@dataclass
class RecordResult:
    """What became of one record read from the source (exceptions do not cross process boundaries intact)."""

    location: str
    sample: EncodedSample | None = None
    error_reason: str | None = None  # a `BadRecordError`, as its fields
    error_kind: str | None = None
    known_too_long: bool = False  # met before as too long: skipped without decoding or tokenizing
    outside_direction: bool = False  # no turn in the region directions in force: passed over, not bad data

    @property
    def error(self) -> BadRecordError | None:
        return None if self.error_reason is None else BadRecordError(self.location, self.error_reason, self.error_kind)

    # From a worker, tensors travel as numpy arrays, pickled by value through the pipe: torch's default passes each
    # tensor's storage as a file descriptor, about 1 ms apiece, which cost more than the decoding saved.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.sample is not None:
            state["sample"] = (type(self.sample), {name: _to_numpy(value) for name, value in vars(self.sample).items()})
        return state

    def __setstate__(self, state: dict) -> None:
        if state["sample"] is not None:
            sample_class, fields = state["sample"]
            state["sample"] = sample_class(**{name: _to_torch(value) for name, value in fields.items()})
        self.__dict__.update(state)


def _to_numpy(value):
    if isinstance(value, dict):  # the sample's image inputs
        return {name: _to_numpy(item) for name, item in value.items()}
    if isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16:  # numpy has no bfloat16
        return value.numpy()
    return value


def _to_torch(value):
    if isinstance(value, dict):
        return {name: _to_torch(item) for name, item in value.items()}
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


class EncodedRecords(IterableDataset):
    """One `RecordResult` per record of this process's (rank's, worker's) share of `source`, pass after pass.

    A worker whose share has given no usable record in two passes in a row ends (the loader goes on with the others).
    """

    def __init__(self, source, encoder: SampleEncoder) -> None:
        self.source = source  # this rank's shard
        self.encoder = encoder
        self._share = None  # this worker's shard of `source`, made when iteration starts (in the worker)
        self._loaded: dict | None = None
        self.passes = 0
        self.too_long: set[str] = set()  # source locations of records over max_length
        self._empty_passes = 0
        self._usable_in_pass = False

    def _worker_share(self):
        info = get_worker_info()
        if info is None or info.num_workers == 1:
            return self.source
        return self.source.shard(info.id, info.num_workers)

    def __iter__(self) -> Iterator[RecordResult]:
        self._share = self._worker_share()
        if self._loaded is not None:
            self._share.load_state_dict(self._loaded["source"])
            self.passes, self.too_long = self._loaded["passes"], set(self._loaded["too_long"])
            self._empty_passes, self._usable_in_pass = self._loaded["empty_passes"], self._loaded["usable_in_pass"]
            self._loaded = None
        self.passes = getattr(self._share, "epoch", self.passes)  # a continued share may start in a later pass
        while True:
            for record, location in self._share:
                self.passes = getattr(self._share, "epoch", self.passes)
                yield self._encode(record, location)
            # A record source counts its passes (one iteration may span a pass an earlier run had wholly read).
            self.passes = getattr(self._share, "epoch", self.passes + 1)
            # Two passes in a row without a usable record (one may be the tail of a resumed pass): give up.
            self._empty_passes = 0 if self._usable_in_pass else self._empty_passes + 1
            self._usable_in_pass = False
            if self._empty_passes >= 2:
                return

    def _encode(self, record: dict, location: str) -> RecordResult:
        if location in self.too_long:
            return RecordResult(location, known_too_long=True)
        try:
            sample = self.encoder.encode_record(record, location, epoch=self.passes)
        except RecordOutsideDirection:
            return RecordResult(location, outside_direction=True)
        except BadRecordError as error:
            if error.kind == "too long":
                self.too_long.add(location)
            return RecordResult(error.location, error_reason=error.reason, error_kind=error.kind)
        self._usable_in_pass = True
        return RecordResult(location, sample)

    def state_dict(self) -> dict[str, Any]:
        if self._share is None:  # not iterated yet in this process: the start of this worker's share
            if self._loaded is not None:
                return self._loaded
            share = self._worker_share()
            return {"source": share.state_dict(), "passes": getattr(share, "epoch", self.passes),
                    "too_long": sorted(self.too_long), "empty_passes": 0, "usable_in_pass": False}
        return {"source": self._share.state_dict(), "passes": self.passes, "too_long": sorted(self.too_long),
                "empty_passes": self._empty_passes, "usable_in_pass": self._usable_in_pass}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    def continue_from(self, states: list[dict[str, Any]]) -> None:
        """Start (before iterating) after a run with another number of ranks or workers: ``states`` are the
        `state_dict()`s of every worker of every rank of that run. The source skips what they had read
        (`RecordSource.continue_from`), the records they found too long stay known, the passes count from the
        earliest of theirs, and the empty-pass count starts over."""
        if not states or any(state is None for state in states):
            raise ValueError("continue_from needs the data state of every worker of every rank of the earlier run")
        self.source.continue_from([state["source"] for state in states])
        self.passes = min(state["passes"] for state in states)
        self.too_long = {location for state in states for location in state["too_long"]}
        self._empty_passes, self._usable_in_pass = 0, False
        self._share, self._loaded = None, None


def build_record_loader(source, encoder: SampleEncoder, num_workers: int = 0, prefetch_factor: int = 2):
    """A `StatefulDataLoader` of `RecordResult`s over `source` (this rank's shard) with `num_workers` workers."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
    with _quiet():
        return StatefulDataLoader(
            EncodedRecords(source, encoder),
            batch_size=None,  # one result per record; rows and micro-batches are assembled by the consumer
            num_workers=num_workers,
            collate_fn=_as_is,
            prefetch_factor=prefetch_factor if num_workers else None,
            snapshot_every_n_steps=1,  # each result carries its worker's position: resume never replays records
        )


def _as_is(result: RecordResult) -> RecordResult:
    return result


def dataset_states(loader_state: dict) -> list[dict]:
    """The `EncodedRecords` state of every worker (one, in-process, with no workers) in a loader state."""
    if "_snapshot" not in loader_state:
        return [loader_state["dataset_state"]]
    workers = loader_state["_snapshot"]["_worker_snapshots"]
    return [workers[name]["dataset_state"] for name in sorted(workers, key=lambda name: int(name.split("_")[1]))]


@contextlib.contextmanager
def _quiet():
    """Without torchdata's deprecation warning about `torch.set_vital` and the worker-count advice (the user chose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        warnings.filterwarnings("ignore", message=".*suggested max number of worker.*")
        yield


def iterate_quietly(loader) -> Iterator[RecordResult]:
    """`iter(loader)`, quietly (see `_quiet`)."""
    with _quiet():
        return iter(loader)


__all__ = ["EncodedRecords", "RecordResult", "build_record_loader", "dataset_states", "iterate_quietly"]
