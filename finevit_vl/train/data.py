"""The training stream of one rank: records -> encoded samples -> the micro-batches of each optimizer step.

Every optimizer step takes `global_batch_size` samples; rank r takes its share, `global_batch_size / world_size`,
from its shard of the source (records `i % world_size == r`), so one process with two accumulation steps and two
processes with one see the same global batch. Records are decoded, resized and tokenized by `data.num_workers`
DataLoader workers (`finevit_vl.train.loader`), one result per record in a fixed order. The share is split into rows (one sample each, or packed up to
`max_length` tokens) and the rows into micro-batches of `micro_batch_size`.

Bad records (undecodable or missing image, box outside the image, too long after image expansion, schema errors)
are skipped, logged with their location, written to `run_dir/bad_records.jsonl` and counted by `BadRecordLog`. The
`BadRecordLimit` (`data.max_bad_records`, `data.max_bad_fraction`) is checked after every record on each rank: once
exceeded, the stream stops reading and hands out a `StepBatch` with `stop_reason` set instead of raising, because the
other ranks would hang in the step's collectives; the trainer reduces the flag and the counts over ranks and stops
all of them together (with N ranks the limit is checked per rank after every record and over all ranks each step).
At the end of a run `BadRecordLog.summary()` (merged over ranks with `merge_summaries`) gives the skipped records by
reason with example locations, written by `write_bad_record_summary`. Records found too long are remembered and
skipped in later passes without being decoded or tokenized again.

The stream's position (the loader's: every worker's source cursor, pass and records known to be too long; and the
counts) is snapshotted after each step, so a checkpoint resumes with exactly the next record and the same counts
(`TrainStream.load_state_dict`, with the same number of processes and workers). With another number of processes or
workers, `TrainStream.continue_from` takes the states of every rank and continues with the records no earlier shard
had read in its pass: no record of a pass is repeated or missed, though the order differs and the bad-record ledger
is merged onto rank 0. A background thread can prepare the next steps while the model trains.
"""

import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import BadRecordError
from ..data.collator import EncodedSample, SampleEncoder, collate_rows
from ..data.packing import pack_rows
from .loader import RecordResult, build_record_loader, dataset_states, iterate_quietly
from .loss import num_targets


logger = logging.getLogger(__name__)

REASON_CHARS = 500  # a reason may quote a record's value (a huge list, say): keep logs and states small
SUMMARY_EXAMPLES = 3  # example locations per reason in the summary
SUMMARY_FILE = "bad_records_summary.json"


class BadRecordLimit:
    """When skipped records end a run: more than `max_count` distinct bad records, or more than `max_fraction` of
    the records read skipped once at least `min_records` were read. `None` disables either limit.

    The count is of distinct records (one met again in a later pass counts once); the fraction is of every record
    taken from the source, repeats included, so it stays the fraction of bad data however many passes a run makes.
    Each rank's stream checks its own counts after every record (so one process stops exactly one record over the
    limit); the trainer checks the counts summed over ranks once per step, so with N ranks the global count can pass
    the limit by the records the other ranks read within that step.
    """

    def __init__(self, max_count: int | None = 100, max_fraction: float | None = 0.1, min_records: int = 200,
                 log_path: str | os.PathLike | None = None) -> None:
        if max_count is not None and max_count < 0:
            raise ValueError(f"data.max_bad_records must be >= 0 or null, got {max_count}")
        if max_fraction is not None and not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1] or null, got {max_fraction}")
        if min_records < 0:
            raise ValueError(f"data.bad_fraction_min_records must be >= 0, got {min_records}")
        self.max_count = max_count
        self.max_fraction = max_fraction
        self.min_records = min_records
        self.log_path = log_path

    @classmethod
    def from_config(cls, data_config, log_path: str | os.PathLike | None = None) -> "BadRecordLimit":
        """From a `DataConfig` (`max_bad_records`, `max_bad_fraction`, `bad_fraction_min_records`)."""
        return cls(data_config.max_bad_records, data_config.max_bad_fraction, data_config.bad_fraction_min_records,
                   log_path)

    def exceeded(self, bad_records: int, records_skipped: int, records_read: int) -> str | None:
        """Why the run must stop with these counts (naming the numbers, the limit and the log), or `None`."""
        see = f"see {self.log_path or 'bad_records.jsonl'} for the locations and reasons"
        if self.max_count is not None and bad_records > self.max_count:
            return f"{bad_records} bad records skipped, over data.max_bad_records={self.max_count}; {see}"
        if (self.max_fraction is not None and records_read >= max(self.min_records, 1)
                and records_skipped > self.max_fraction * records_read):
            return (
                f"{records_skipped} of {records_read} records read were skipped ({records_skipped / records_read:.1%}), "
                f"over data.max_bad_fraction={self.max_fraction:g} (checked once data.bad_fraction_min_records="
                f"{self.min_records} records are read); {see}"
            )
        return None


class BadRecordLog:
    """This rank's ledger of records read and skipped; appends one JSON line per distinct bad record to `path`
    (shared by all ranks, O_APPEND).

    A record is reported once: meeting it again in a later pass over the data neither logs it nor counts it as
    another bad record (`count`), though it counts as skipped (`records_skipped`) for the fraction.
    """

    def __init__(self, path: str | os.PathLike | None, rank: int = 0) -> None:
        self.path = None if path is None else Path(path)
        self.rank = rank
        self.records_read = 0  # taken from the source, every pass
        self.records_skipped = 0  # of those, skipped as bad
        self.records: dict[str, tuple[str, str]] = {}  # "split:location" -> (kind, reason), in the order met

    @property
    def count(self) -> int:
        """Distinct bad records."""
        return len(self.records)

    def add(self, error: BadRecordError, split: str = "train") -> None:
        self.records_skipped += 1
        key = f"{split}:{error.location}"
        if key in self.records:
            return
        reason = error.reason if len(error.reason) <= REASON_CHARS else error.reason[:REASON_CHARS] + "..."
        self.records[key] = (error.kind, reason)
        logger.warning("skipping bad %s record %s: %s", split, error.location, reason)
        if self.path is not None:
            entry = {"split": split, "location": error.location, "kind": error.kind, "reason": reason, "rank": self.rank}
            # One write() per line on an O_APPEND descriptor: lines of concurrent ranks never interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            finally:
                os.close(fd)

    def summary(self) -> dict:
        """This rank's skipped records by reason; see `summarize_bad_records`."""
        return summarize_bad_records(self.state_dict())

    def state_dict(self) -> dict:
        return {
            "records_read": self.records_read,
            "records_skipped": self.records_skipped,
            "bad_locations": {key: list(value) for key, value in self.records.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """From `state_dict()` (or a `TrainStream` state, which includes it)."""
        locations = state["bad_locations"]
        if isinstance(locations, list):  # checkpoints before counts and reasons were kept
            locations = dict.fromkeys(locations, ("other", ""))
        self.records = {key: (kind, reason) for key, (kind, reason) in locations.items()}
        self.records_read = state.get("records_read", 0)
        self.records_skipped = state.get("records_skipped", len(self.records))


def _finish_summary(records_read: int, records_skipped: int, by_reason: dict[str, dict]) -> dict:
    ordered = dict(sorted(by_reason.items(), key=lambda item: (-item[1]["count"], item[0])))
    return {
        "records_read": records_read,
        "records_skipped": records_skipped,
        "bad_records": sum(entry["count"] for entry in ordered.values()),
        "skipped_fraction": records_skipped / records_read if records_read else None,
        "by_reason": ordered,
    }


def summarize_bad_records(state: dict) -> dict:
    """Skipped records by reason from a `BadRecordLog` or `TrainStream` state (a `StepBatch.state` gives the exact
    counts at that step, while the prefetcher may have read further).

    Returns `{"records_read", "records_skipped", "bad_records" (distinct), "skipped_fraction", "by_reason":
    {kind: {"count", "examples": [{"location", "reason"}, ...]}}}`, most frequent reason first.
    """
    by_reason: dict[str, dict] = {}
    locations = state["bad_locations"]
    items = locations.items() if isinstance(locations, dict) else ((key, ("other", "")) for key in locations)
    for key, (kind, reason) in items:
        entry = by_reason.setdefault(kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < SUMMARY_EXAMPLES:
            entry["examples"].append({"location": key.partition(":")[2], "reason": reason})
    return _finish_summary(state.get("records_read", 0), state.get("records_skipped", 0), by_reason)


def merge_summaries(summaries: Iterable[dict]) -> dict:
    """One summary from those of several ranks (e.g. `accelerate.utils.gather_object([summary])`); ranks read
    disjoint records, so the counts add up."""
    summaries = list(summaries)
    by_reason: dict[str, dict] = {}
    for summary in summaries:
        for kind, entry in summary["by_reason"].items():
            merged = by_reason.setdefault(kind, {"count": 0, "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:SUMMARY_EXAMPLES]
    return _finish_summary(sum(s["records_read"] for s in summaries), sum(s["records_skipped"] for s in summaries),
                           by_reason)


def format_bad_record_summary(summary: dict) -> str:
    """A few lines for the log: the totals, then one row per reason with its example locations."""
    read, skipped = summary["records_read"], summary["records_skipped"]
    if not summary["by_reason"]:
        return f"bad records: none among {read} records read"
    fraction = f" ({summary['skipped_fraction']:.1%})" if summary["skipped_fraction"] is not None else ""
    lines = [f"bad records: {summary['bad_records']} distinct, {skipped} of {read} records read skipped{fraction}",
             f"  {'reason':<20} {'records':>7}  examples"]
    for kind, entry in summary["by_reason"].items():
        examples = ", ".join(example["location"] for example in entry["examples"])
        more = ", ..." if entry["count"] > len(entry["examples"]) else ""
        lines.append(f"  {kind:<20} {entry['count']:>7}  {examples}{more}")
    return "\n".join(lines)


def write_bad_record_summary(summaries: dict | Iterable[dict], run_dir: str | os.PathLike) -> dict:
    """Merge the ranks' summaries, write `run_dir/bad_records_summary.json` (atomically) and log the table; returns
    the merged summary. Call it on one process."""
    summary = summaries if isinstance(summaries, dict) else merge_summaries(summaries)
    run_dir = Path(run_dir)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{SUMMARY_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w") as file:
        json.dump(summary, file, indent=2)
        file.write("\n")
    os.replace(tmp, run_dir / SUMMARY_FILE)
    log = logger.warning if summary["by_reason"] else logger.info
    log("%s\n  (written to %s)", format_bad_record_summary(summary), run_dir / SUMMARY_FILE)
    return summary


@dataclass
class StepBatch:
    """What one rank feeds to one optimizer step.

    `stop_reason` is set (and the batch empty) once the bad-record limit is exceeded or the shard yields no usable
    record: the trainer must stop every rank, not train on it.
    """

    micro_batches: list[dict]
    num_samples: int
    num_targets: int  # supervised next-token targets on this rank
    num_tokens: int  # real (non-padding) tokens, image tokens included
    num_slots: int  # all token slots including padding
    num_images: int
    num_patches: int
    state: dict = field(default_factory=dict)  # stream position and bad-record counts after this step
    stop_reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # the batcher's own counts (e.g. captions cut), logged


@dataclass
class TokenBatcher:
    """A rank's share of one step -> micro-batches of `micro_batch_size` rows, one sample per row or packed up to
    `max_length` tokens (the next-token stages); a step's targets are its supervised tokens."""

    micro_batch_size: int
    pack: bool
    max_length: int | None
    pad_token_id: int
    dummy_image_inputs: dict | None
    count_regions: bool = False  # region self-distillation: the step's boxes normalise its loss

    def step_counts(self, samples: list[EncodedSample]) -> dict[str, int]:
        if not self.count_regions:
            return {}
        return {"distill_regions": sum(len(s.regions["boxes"]) for s in samples if s.regions is not None)}

    def micro_batches(self, samples: list[EncodedSample]) -> list[dict]:
        if self.pack:
            rows = [[samples[i] for i in row] for row in pack_rows([s.length for s in samples], self.max_length)]
        else:
            rows = [[sample] for sample in samples]
        return [collate_rows(rows[i : i + self.micro_batch_size], self.pad_token_id, self.dummy_image_inputs)
                for i in range(0, len(rows), self.micro_batch_size)]

    @staticmethod
    def num_targets(samples: list[EncodedSample], micro_batches: list[dict]) -> int:
        return sum(num_targets(mb["labels"]) for mb in micro_batches)

    @staticmethod
    def num_slots(micro_batches: list[dict]) -> int:
        return sum(mb["input_ids"].numel() for mb in micro_batches)


class TrainStream:
    """Endless per-rank stream of `StepBatch`es over a sharded, resumable record source.

    Records are decoded, resized and tokenized by `num_workers` DataLoader workers (0: in this process, see
    `finevit_vl.train.loader`); this process counts bad records, checks `limit` (default: none) after every record,
    and `batcher` (default: `TokenBatcher`; the encoder stages use `finevit_vl.data.image_samples.ImageBatcher`)
    packs and collates the step's micro-batches.
    """

    def __init__(
        self,
        source,
        encoder: SampleEncoder,
        samples_per_step: int,
        micro_batch_size: int,
        pack: bool,
        pad_token_id: int,
        bad_records: BadRecordLog,
        limit: BadRecordLimit | None = None,
        num_workers: int = 0,
        batcher=None,
    ) -> None:
        self.source = source
        self.encoder = encoder
        self.samples_per_step = samples_per_step
        self.micro_batch_size = micro_batch_size
        self.pack = pack
        self.pad_token_id = pad_token_id
        self.bad_records = bad_records
        self.limit = limit or BadRecordLimit(None, None)
        self.num_workers = num_workers
        self.batcher = batcher or TokenBatcher(micro_batch_size, pack, encoder.max_length if pack else None,
                                               pad_token_id, getattr(encoder, "dummy_image_inputs", None))
        self.loader = build_record_loader(source, encoder, num_workers)
        self.stop_reason: str | None = None
        self._results: Iterator[RecordResult] | None = None

    @property
    def passes(self) -> int:
        """Complete passes over this rank's shard (the fewest of any worker's share)."""
        return min((state or {}).get("passes", 0) for state in dataset_states(self.loader.state_dict()))

    @property
    def too_long(self) -> set[str]:
        """Records known to be over `max_length`, skipped without decoding when met again."""
        return {location for state in dataset_states(self.loader.state_dict()) for location in (state or {}).get(
            "too_long", ())}

    def _next_sample(self) -> EncodedSample | None:
        """The next usable sample, or `None` once the stream must stop (`stop_reason` says why)."""
        log = self.bad_records
        if self._results is None:
            self._results = iterate_quietly(self.loader)
        while True:
            result = next(self._results, None)
            if result is None:
                self.stop_reason = (f"data.train ({self.source!r}) yields no usable record on this rank; see "
                                    f"{log.path or 'bad_records.jsonl'}")
                return None
            log.records_read += 1
            if result.outside_direction:  # a record of the other region direction (train.phases / data.region_directions)
                continue
            if result.known_too_long:
                log.records_skipped += 1  # reported when first met; neither decoded nor tokenized again
            elif (error := result.error) is not None:
                log.add(error)
            self.stop_reason = self.limit.exceeded(log.count, log.records_skipped, log.records_read)
            if self.stop_reason is not None:
                return None
            if result.sample is not None:
                return result.sample

    def next_step(self) -> StepBatch:
        samples: list[EncodedSample] = []
        while self.stop_reason is None and len(samples) < self.samples_per_step:
            sample = self._next_sample()
            if sample is not None:
                samples.append(sample)
        if self.stop_reason is not None:
            # Never raise here: the other ranks would wait forever in this step's collectives.
            return StepBatch([], 0, 0, 0, 0, 0, 0, state=self.state_dict(), stop_reason=self.stop_reason)
        micro_batches = self.batcher.micro_batches(samples)
        return StepBatch(
            micro_batches=micro_batches,
            num_samples=len(samples),
            num_targets=self.batcher.num_targets(samples, micro_batches),
            num_tokens=sum(s.length for s in samples),
            num_slots=self.batcher.num_slots(micro_batches),
            num_images=sum(s.num_images for s in samples),
            num_patches=sum(s.num_patches for s in samples),
            state=self.state_dict(),
            counts=self.batcher.step_counts(samples),
        )

    def reconfigure(self, change) -> None:
        """Apply `change(encoder)` (a new phase: pixel budget, text length) to every record read from now on: the
        loader and its workers are rebuilt at the current position, so nothing encoded before is handed out."""
        state = self.loader.state_dict()
        change(self.encoder)
        self.loader = build_record_loader(self.source, self.encoder, self.num_workers)
        self.loader.load_state_dict(state)
        self._results = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the loader's position (every worker's source cursor, pass and over-long records),
        `bad_records` (distinct, for the trainer's check), `records_read`, `records_skipped` and `bad_locations`
        ({location: [kind, reason]})."""
        return {
            "loader": self.loader.state_dict(),
            "num_workers": self.num_workers,
            "bad_records": self.bad_records.count,
            **self.bad_records.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "loader" not in state or state.get("num_workers", 0) != self.num_workers:
            raise ValueError(
                f"the data position was saved with data.num_workers={state.get('num_workers', 0)} but this run has "
                f"{self.num_workers}; resume with the same number of processes and workers, or use continue_from "
                "with the states of every rank"
            )
        self.loader.load_state_dict(state["loader"])
        self.bad_records.load_state_dict(state)
        self.stop_reason = None  # a resumed run checks again, under its own limit
        self._results = None

    def continue_from(self, states: list[dict], rank: int) -> None:
        """Resume after a run with another number of processes and/or DataLoader workers: ``states`` are that
        run's `state_dict()`s of every rank, in rank order, and ``rank`` is this process's rank now (this stream's
        source being that rank's shard of the same source).

        The loader is rebuilt so that this rank's shard, pass by pass, skips every record some earlier rank's
        worker had already read in that pass (`finevit_vl.data.sources.RecordSource.continue_from`): over all new
        ranks, every record of a pass is read once, in another order than an uninterrupted run. Passes start from
        the earliest pass of any earlier shard; records known to be too long stay known. Bad-record ledger: rank 0
        takes the merged ledger of all earlier ranks (their bad records, and the sums of records read and skipped),
        the other ranks start empty, so the totals over ranks carry on; as a rank no longer knows which bad records
        another reported, a bad record met again in a later pass may be reported (logged and counted) once more.
        Sources split by whole tar file (WebDataset) cannot continue this way (ValueError).
        """
        if not states or any("loader" not in state for state in states):
            raise ValueError("continue_from needs the data state (with its loader position) of every rank of the "
                             "earlier run")
        workers = [worker for state in states for worker in dataset_states(state["loader"])]
        self.loader = build_record_loader(self.source, self.encoder, self.num_workers)
        self.loader.dataset.continue_from(workers)
        if self.num_workers > 1:
            self.source.shard(0, self.num_workers)  # a source that cannot continue in workers says so here
        log = self.bad_records
        log.records, log.records_read, log.records_skipped = {}, 0, 0
        if rank == 0:
            for state in states:
                earlier = BadRecordLog(None)
                earlier.load_state_dict(state)
                for key, entry in earlier.records.items():
                    log.records.setdefault(key, entry)
                log.records_read += earlier.records_read
                log.records_skipped += earlier.records_skipped
        self.stop_reason = None
        self._results = None


class Prefetcher:
    """Prepares up to `depth` steps ahead (at most `num_steps` in all) in a background thread, so decoding,
    tokenization and collation overlap with training.

    Steps come out in order with the stream state snapshotted at each, so checkpoints stay exact. Errors raised in
    the thread are re-raised by `next()`; after a step with `stop_reason` the thread ends and `next()` returns that
    step again. `depth=0` prepares each step inline.
    """

    def __init__(self, stream: TrainStream, depth: int, num_steps: int) -> None:
        self.stream = stream
        self.depth = depth
        self.num_steps = num_steps
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._stopped: StepBatch | None = None
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="finevit-vl-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self.num_steps):
                if self._stop.is_set():
                    return
                item = self.stream.next_step()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item.stop_reason is not None:  # the stream reads no further
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._queue.put(error)

    def next(self) -> StepBatch:
        if self._thread is None:
            return self.stream.next_step()  # a stopped stream keeps handing out its stop
        if self._stopped is not None:
            return self._stopped
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.stop_reason is not None:
            self._stopped = item  # the thread has ended: hand the same stop out again
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = [
    "BadRecordLimit",
    "BadRecordLog",
    "Prefetcher",
    "StepBatch",
    "TrainStream",
    "format_bad_record_summary",
    "merge_summaries",
    "summarize_bad_records",
    "write_bad_record_summary",
]
