"""The training stream of one rank: records -> encoded samples -> the micro-batches of each optimizer step.

Every optimizer step takes `global_batch_size` samples; rank r takes its share, `global_batch_size / world_size`,
from its shard of the source (records `i % world_size == r`), so one process with two accumulation steps and two
processes with one see the same global batch. The share is split into rows (one sample each, or packed up to
`max_length` tokens) and the rows into micro-batches of `micro_batch_size`.

Bad records (undecodable or missing image, box outside the image, too long after image expansion, schema errors)
are skipped, logged with their location, written to `run_dir/bad_records.jsonl` and counted; the trainer stops when
the count over all ranks passes `max_bad_records`.

The stream's position (the source cursor and the pass number) is snapshotted after each step, so a checkpoint
resumes with exactly the next record. A background thread can prepare the next steps while the model trains.
"""

import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..data import BadRecordError
from ..data.collator import SampleEncoder, collate_rows
from ..data.packing import pack_rows
from .loss import num_targets


logger = logging.getLogger(__name__)


class BadRecordLog:
    """Counts skipped records and appends one JSON line per record to `path` (shared by all ranks, O_APPEND).

    A record is reported once: meeting it again in a later pass over the data neither logs nor counts it again, so a
    few bad records cannot add up to `max_bad_records` over a long multi-epoch run.
    """

    def __init__(self, path: str | os.PathLike | None, rank: int = 0) -> None:
        self.path = None if path is None else Path(path)
        self.rank = rank
        self.locations: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.locations)

    def add(self, error: BadRecordError, split: str = "train") -> None:
        key = f"{split}:{error.location}"
        if key in self.locations:
            return
        self.locations.add(key)
        logger.warning("skipping bad %s record %s: %s", split, error.location, error.reason)
        if self.path is not None:
            line = json.dumps({"split": split, "location": error.location, "reason": error.reason, "rank": self.rank}) + "\n"
            # One write() per line on an O_APPEND descriptor: lines of concurrent ranks never interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def state_dict(self) -> list[str]:
        return sorted(self.locations)

    def load_state_dict(self, state: list[str]) -> None:
        self.locations = set(state)


@dataclass
class StepBatch:
    """What one rank feeds to one optimizer step."""

    micro_batches: list[dict]
    num_samples: int
    num_targets: int  # supervised next-token targets on this rank
    num_tokens: int  # real (non-padding) tokens, image tokens included
    num_slots: int  # all token slots including padding
    num_images: int
    num_patches: int
    state: dict = field(default_factory=dict)  # stream position after this step


class TrainStream:
    """Endless per-rank stream of `StepBatch`es over a sharded, resumable record source."""

    def __init__(
        self,
        source,
        encoder: SampleEncoder,
        samples_per_step: int,
        micro_batch_size: int,
        pack: bool,
        pad_token_id: int,
        bad_records: BadRecordLog,
    ) -> None:
        self.source = source
        self.encoder = encoder
        self.samples_per_step = samples_per_step
        self.micro_batch_size = micro_batch_size
        self.pack = pack
        self.pad_token_id = pad_token_id
        self.bad_records = bad_records
        self.passes = 0
        self._iterator = None
        self._usable_in_pass = False
        self._empty_passes = 0

    def _next_sample(self):
        while True:
            if self._iterator is None:
                self._iterator = iter(self.source)
                self._usable_in_pass = False
            try:
                record, location = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.passes += 1
                # Two passes in a row without a usable record (one may be the tail of a resumed pass): give up.
                self._empty_passes = 0 if self._usable_in_pass else self._empty_passes + 1
                if self._empty_passes >= 2:
                    raise ValueError(f"data.train ({self.source!r}) yields no usable record on this rank; see bad_records.jsonl") from None
                continue
            try:
                sample = self.encoder.encode_record(record, location, epoch=self.passes)
            except BadRecordError as error:
                self.bad_records.add(error)
                continue
            self._usable_in_pass = True
            return sample

    def next_step(self) -> StepBatch:
        samples = [self._next_sample() for _ in range(self.samples_per_step)]
        if self.pack:
            rows = [[samples[i] for i in row] for row in pack_rows([s.length for s in samples], self.encoder.max_length)]
        else:
            rows = [[sample] for sample in samples]
        image_processor = self.encoder.image_processor
        micro_batches = [
            collate_rows(rows[i : i + self.micro_batch_size], self.pad_token_id, image_processor)
            for i in range(0, len(rows), self.micro_batch_size)
        ]
        return StepBatch(
            micro_batches=micro_batches,
            num_samples=len(samples),
            num_targets=sum(num_targets(mb["labels"]) for mb in micro_batches),
            num_tokens=sum(s.length for s in samples),
            num_slots=sum(mb["input_ids"].numel() for mb in micro_batches),
            num_images=sum(s.num_images for s in samples),
            num_patches=sum(s.num_patches for s in samples),
            state=self.state_dict(),
        )

    def state_dict(self) -> dict:
        bad = self.bad_records.state_dict()
        return {"source": self.source.state_dict(), "passes": self.passes, "bad_records": len(bad), "bad_locations": bad}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.passes = state["passes"]
        self.bad_records.load_state_dict(state["bad_locations"])
        self._iterator = None


class Prefetcher:
    """Prepares up to `depth` steps ahead (at most `num_steps` in all) in a background thread, so decoding,
    tokenization and collation overlap with training.

    Steps come out in order with the stream state snapshotted at each, so checkpoints stay exact. Errors raised in
    the thread are re-raised by `next()`. `depth=0` prepares each step inline.
    """

    def __init__(self, stream: TrainStream, depth: int, num_steps: int) -> None:
        self.stream = stream
        self.depth = depth
        self.num_steps = num_steps
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
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
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._queue.put(error)

    def next(self) -> StepBatch:
        if self._thread is None:
            return self.stream.next_step()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["BadRecordLog", "Prefetcher", "StepBatch", "TrainStream"]
