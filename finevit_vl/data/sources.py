"""Where records come from: JSONL + image folder, WebDataset tar shards, Hugging Face datasets, and weighted mixtures.

Every source is an iterable of ``(record, location)`` pairs; ``location`` is what a human needs to find the record
(``data/train.jsonl:17``, ``shards/shard-00003.tar:sample_042``, ``data/x.parquet[train]:9``). Sources do not open
images and never raise for a single bad record: a line or sample that cannot be parsed comes out as
``{"_error": reason, "_error_kind": kind}`` so the consumer's one ``except BadRecordError`` (raised by
`finevit_vl.data.images.load_record_images`) catches it and the stream goes on. A typical consumer::

    for record, location in source:
        try:
            images = load_record_images(record, location)   # validates, opens, fills width/height
        except BadRecordError as err:
            skipped += 1; logger.warning("%s", err); continue
        messages = record_to_messages(record, record["width"], record["height"])

Distributed training: ``source.shard(rank, world_size)`` yields only the records whose index ``i`` in the full
stream has ``i % world_size == rank`` (deterministic; shards compose: ranks, then DataLoader workers; WebDataset
sources split whole tar files instead when they have enough of them). Resume with the same sharding:
``state_dict()`` after consuming records, ``load_state_dict(state)`` on a fresh source with the same sharding, and
iteration continues with the next record. Resume with another sharding (another number of processes or DataLoader
workers): ``source.shard(rank, world_size).continue_from(states)`` with the states of *every* shard of the earlier run;
each new shard then skips the records (by index, per pass) that some earlier shard already took, so the whole run
sees every record of a pass once (not in the same order). Sources split by whole tar file cannot do this. A file
source is a single cursor: iterating again continues where the last iteration stopped, and starts over after a
complete pass. `MixtureSource` is endless.

Configs: each source has a typed config (`JsonlSourceConfig`, `WebDatasetSourceConfig`, `HFDatasetSourceConfig`,
`MixtureSourceConfig`; YAML ``{type: jsonl, path: ...}``), read by the loader of `finevit_vl.data.configs` like every
other config section; `resolve_source_paths` is the one place that makes their paths absolute, and `build_source`
turns a config (or its YAML form) into its source.
"""

import copy
import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import posixpath
import random
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .configs import from_mapping
from .formats import to_schema
from .schema import BadRecordError, Record


RecordWithLocation = tuple[Record, str]
PathLike = str | os.PathLike
IMAGE_EXTENSIONS: frozenset[str] = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"})
_JSON_SEPARATOR = re.compile(r"[\s,]*")  # what separates the items of a JSON array


class Source(Protocol):
    """What the trainer relies on; implemented by `RecordSource` subclasses and `MixtureSource`."""

    def __iter__(self) -> Iterator[RecordWithLocation]: ...

    def shard(self, rank: int, world_size: int) -> "Source": ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def continue_from(self, states: list[dict[str, Any]]) -> None: ...


def _check_shard(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(
            f"shard(rank={rank}, world_size={world_size}): need world_size >= 1 and 0 <= rank < world_size"
        )


ShardCursor = tuple[int, int, int, int]  # (rank, world_size, position, epoch) of one shard of an earlier run


def _meets(rank: int, world_size: int, other_rank: int, other_world_size: int) -> bool:
    """Whether the index classes ``rank mod world_size`` and ``other_rank mod other_world_size`` share an index."""
    return (rank - other_rank) % math.gcd(world_size, other_world_size) == 0


@dataclass(frozen=True)
class _TakenBefore:
    """The records earlier runs took, by pass, for a source resumed with another sharding (`continue_from`).

    Shard ``(rank, world, position, epoch)`` took, in pass ``epoch``, the indices ``rank + k * world`` for
    ``k < position``, and in every earlier pass all of its indices. ``shards`` are the cursors of the run resumed
    from, which together cover the whole stream (restricted to those that meet this source's indices); ``older``
    are cursors of runs before that one whose records may be ahead of those cursors (a run resumed again before it
    moved past what it had to skip).
    """

    shards: tuple[ShardCursor, ...]
    older: tuple[ShardCursor, ...] = ()
    _all: tuple[ShardCursor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_all", self.shards + self.older)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "_TakenBefore | None":
        if not state:
            return None
        return cls(tuple(map(tuple, state["shards"])), tuple(map(tuple, state.get("older", ()))))

    def to_state(self) -> dict[str, Any]:
        return {"shards": [list(cursor) for cursor in self.shards], "older": [list(cursor) for cursor in self.older]}

    def restricted(self, rank: int, world_size: int) -> "_TakenBefore":
        """Only the cursors whose indices meet those of shard ``rank`` / ``world_size``."""
        def meets(cursor: ShardCursor) -> bool:
            return _meets(cursor[0], cursor[1], rank, world_size)

        return _TakenBefore(tuple(filter(meets, self.shards)), tuple(filter(meets, self.older)))

    def first_epoch(self) -> int:
        """The first pass not wholly taken (for the indices the ``shards`` cover)."""
        return min(epoch for _, _, _, epoch in self.shards)

    def last_epoch(self) -> int:
        """The last pass of which some record was taken (-1: none)."""
        return max((epoch if position else epoch - 1 for _, _, position, epoch in self._all), default=-1)

    def taken(self, index: int, epoch: int) -> bool:
        for rank, world_size, position, taken_epoch in self._all:
            if index % world_size == rank and (
                taken_epoch > epoch or (taken_epoch == epoch and (index - rank) // world_size < position)
            ):
                return True
        return False

    def untaken_from(self, epoch: int) -> int | None:
        """An index below which every record was taken in pass ``epoch`` (``None``: all of them were): each index
        belongs to one of ``shards``, which took all of its indices below its cursor."""
        bounds = [rank + position * world_size if taken_epoch == epoch else rank
                  for rank, world_size, position, taken_epoch in self.shards if taken_epoch <= epoch]
        return min(bounds, default=None)


def _check_cover(shards: Sequence[ShardCursor], what: str) -> None:
    """The shards of a run: every index of the stream in exactly one of them."""
    ok = all(0 <= rank < world_size for rank, world_size, _, _ in shards) and sum(
        Fraction(1, world_size) for _, world_size, _, _ in shards) == 1
    if ok:  # the densities add up to 1: the shards cover the stream iff no two share an index
        period = math.lcm(*(world_size for _, world_size, _, _ in shards))
        if period <= 1 << 22:  # mark the indices of one period (the usual case: ranks x workers)
            marked = bytearray(period)
            for rank, world_size, _, _ in shards:
                if any(marked[rank::world_size]):
                    ok = False
                    break
                marked[rank::world_size] = b"\x01" * len(range(rank, period, world_size))
        else:
            ok = not any(_meets(a[0], a[1], b[0], b[1]) for i, a in enumerate(shards) for b in shards[i + 1:])
    if not ok:
        raise ValueError(
            f"{what}: continue_from needs the data position of every shard (rank x DataLoader worker) of the earlier "
            f"run, each once; these {len(shards)} (rank, world_size) do not cover the stream exactly once: "
            f"{sorted({(rank, world_size) for rank, world_size, _, _ in shards})}"
        )


class RecordSource(ABC):
    """A finite, ordered stream of records with a resumable cursor and deterministic sharding."""

    def __init__(self) -> None:
        self._rank, self._world_size = 0, 1
        self._position = 0  # indices of this shard passed in the current pass (yielded, or skipped as taken before)
        self._epoch = 0  # completed passes
        self._resumed: _TakenBefore | None = None  # given to continue_from; shards of this source start from it
        self._skip: _TakenBefore | None = None  # records taken before, still ahead of the cursor

    @property
    def epoch(self) -> int:
        """Completed passes (the pass being read)."""
        return self._epoch

    @property
    def continuing(self) -> bool:
        """Whether records an earlier run took (`continue_from`) are still to be skipped."""
        return self._skip is not None

    @abstractmethod
    def _stream(self, start: int, step: int) -> Iterator[RecordWithLocation]:
        """One pass over the records with index ``start, start + step, ...`` of the full stream."""

    def __iter__(self) -> Iterator[RecordWithLocation]:
        while True:
            skipping, yielded = self._skip is not None, False
            for pair in self._pass():
                yielded = True
                yield pair
            self._position = 0
            self._epoch += 1
            if self._skip is not None and self._epoch > self._skip.last_epoch():
                self._skip = None
            if yielded or not skipping:
                return
            # A pass whose records were all taken before: go on with the next one, so it does not look empty.

    def _pass(self) -> Iterator[RecordWithLocation]:
        skip = self._skip
        if skip is not None:
            bound = skip.untaken_from(self._epoch)
            if bound is None:
                return
            self._position = max(self._position, -(-(bound - self._rank) // self._world_size))
        start = self._rank + self._position * self._world_size
        for pair in self._stream(start, self._world_size):
            index = self._rank + self._position * self._world_size
            self._position += 1
            if skip is None or not skip.taken(index, self._epoch):
                yield pair

    def shard(self, rank: int, world_size: int) -> "RecordSource":
        """A copy that yields every ``world_size``-th record of this source, starting at its ``rank``-th.

        The copy starts at the first pass; a source given `continue_from` hands its shards the records to skip, so
        they start where it does.
        """
        _check_shard(rank, world_size)
        view = copy.copy(self)
        view._rank = self._rank + rank * self._world_size
        view._world_size = self._world_size * world_size
        view._position, view._epoch, view._resumed, view._skip = 0, 0, None, None
        if self._resumed is not None:
            view._start_from(self._resumed)
        return view

    def continue_from(self, states: list[dict[str, Any]]) -> None:
        """Continue the stream of a run with another sharding: ``states`` are the `state_dict()` of every shard of
        that run (all ranks, all DataLoader workers; they must cover the stream exactly once).

        This source (itself any shard of the same source) then starts at the first pass some earlier shard is in,
        and in that pass and later ones skips the records an earlier shard already took in that pass: skipped
        records advance the cursor but are not yielded. The skip list is kept in `state_dict()` until the cursor
        moves past it, so the run can be resumed again (same sharding: `load_state_dict`; another:
        `continue_from` again, which unions what is still pending with the new cursors).
        """
        if not states:
            raise ValueError(f"{self!r}: continue_from needs the data states of the earlier run's shards, got none")
        shards = tuple((s["rank"], s["world_size"], s["position"], s["epoch"]) for s in states)
        _check_cover(shards, repr(self))
        first = min(epoch for _, _, _, epoch in shards)
        older = (tuple(cursor) for s in states if s.get("skip")
                 for cursor in (*s["skip"]["shards"], *s["skip"].get("older", ())))
        # Cursors of runs before that are behind `first` (or took nothing in it) say nothing new.
        older = tuple(dict.fromkeys(c for c in older if c[3] > first or (c[3] == first and c[2] > 0)))
        self._start_from(_TakenBefore(shards, older))

    def _start_from(self, taken: _TakenBefore) -> None:
        taken = taken.restricted(self._rank, self._world_size)
        self._resumed = taken
        self._position, self._epoch = 0, taken.first_epoch()
        self._skip = taken if taken.last_epoch() >= self._epoch else None

    def state_dict(self) -> dict[str, Any]:
        state = {"position": self._position, "epoch": self._epoch, "rank": self._rank, "world_size": self._world_size}
        if self._skip is not None:
            state["skip"] = self._skip.to_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rank"], state["world_size"]) != (self._rank, self._world_size):
            raise ValueError(
                f"{self!r}: state was saved for shard {state['rank']}/{state['world_size']} but this source is shard "
                f"{self._rank}/{self._world_size}; resume with the same number of processes and workers, or use "
                "continue_from with the states of every shard"
            )
        self._position, self._epoch = state["position"], state["epoch"]
        self._skip = _TakenBefore.from_state(state.get("skip"))


def _unusable(reason: str, kind: str, **keys: Any) -> Record:
    """The marker of a line / sample that cannot become a record (raised as `BadRecordError` by `validate_record`)."""
    return {**keys, "_error": reason, "_error_kind": kind}


def _parse_json(data: bytes) -> Record:
    """One JSON object, or an ``_error`` marker saying why it is not one."""
    try:
        record = json.loads(data)
    except UnicodeDecodeError as err:
        return _unusable(f"not UTF-8 text ({err.reason} at byte {err.start})", "malformed JSON")
    except json.JSONDecodeError as err:
        return _unusable(f"malformed JSON ({err.msg} at column {err.colno})", "malformed JSON")
    return _as_object(record)


def _as_object(record: Any) -> Record:
    if not isinstance(record, dict):
        return _unusable(f"expected a JSON object, got {type(record).__name__}", "malformed JSON")
    return record


def _to_schema(record: Record, location: str) -> Record:
    """A parsed record in our schema, whatever format it came in (`finevit_vl.data.formats`), or an ``_error``
    marker naming the accepted formats."""
    try:
        return to_schema(record, location)
    except BadRecordError as err:
        keys = {"id": record["id"]} if isinstance(record.get("id"), str) else {}
        return _unusable(err.reason, err.kind, **keys)


class JsonlSource(RecordSource):
    """Records from one JSONL file, or one JSON file holding an array of records (LLaVA style); relative image paths
    resolve against ``image_root`` (default: the file's folder).

    Blank lines are ignored (they are not records and do not count for sharding); locations use 1-based line numbers
    (of the line where the record starts, in a JSON array).
    """

    def __init__(self, path: PathLike, image_root: PathLike | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"JSONL file not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r})"

    def _is_array(self) -> bool:
        with open(self.path, "rb") as file:
            head = file.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return head.startswith(b"[")

    def __len__(self) -> int:
        """Records in the file (non-blank lines, or array items), whatever this view's shard."""
        if self._is_array():
            return sum(1 for _ in _array_items(self.path))
        with open(self.path, "rb") as file:
            return sum(1 for line in file if line.strip())

    def _stream(self, start: int, step: int) -> Iterator[RecordWithLocation]:
        items = _array_items(self.path) if self._is_array() else self._lines()
        for index, (line_number, data) in enumerate(items):
            if index < start or (index - start) % step:
                continue
            location = f"{self.path}:{line_number}"
            record = _to_schema(_parse_json(data) if isinstance(data, bytes) else _as_object(data), location)
            if "_error" not in record:
                record["_image_root"] = str(self.image_root)
            yield record, location

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        # Binary lines: skipped records are never decoded, and a bad byte spoils only its own line.
        with open(self.path, "rb") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    yield line_number, line


def _array_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line where it starts, parsed item)`` per item of a JSON array file; an item that does not parse ends the
    file with an ``_error`` marker (the rest of an array cannot be found without it)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        yield 1, _unusable(f"not UTF-8 text ({err.reason} at byte {err.start})", "malformed JSON")
        return
    decoder = json.JSONDecoder()
    position = re.compile(r"\s*\[").match(text).end()
    position = _JSON_SEPARATOR.match(text, position).end()
    line, counted = 1, 0
    while position < len(text) and text[position] != "]":
        line, counted = line + text.count("\n", counted, position), position
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            reason = f"malformed JSON ({err.msg} at line {err.lineno} column {err.colno}); the rest of the array is not read"
            yield line, _unusable(reason, "malformed JSON")
            return
        yield line, item
        position = _JSON_SEPARATOR.match(text, position).end()


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/abc.0.png`` -> key ``dir/abc``, extension ``0.png`` (split at the first dot)."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension


class WebDatasetSource(RecordSource):
    """Records from WebDataset-style tar shards, streamed with the stdlib ``tarfile`` (no extraction to disk).

    A sample is the run of consecutive members sharing a key: ``key.json`` (the record; ``id`` defaults to the key)
    plus its images (``key.png``, ``key.0.jpg``, ...). The record's ``image`` may name its images by extension
    (``"png"``) or file name (``"key.png"``); without it, all image members are used in name order. Encoded images
    travel in ``record["_image_bytes"]``. Sharding is by whole tar file when there are at least as many files as
    shards (shard r of n reads files ``r, r + n, ...`` only, so no process reads another's files; the samples per
    shard then follow the files' sizes), otherwise per sample (every shard streams every file and skips the others'
    samples).
    """

    def __init__(self, shards: PathLike | Sequence[PathLike]) -> None:
        super().__init__()
        patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        self.shards: list[str] = []
        for pattern in map(str, patterns):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            missing = [path for path in matches if not os.path.isfile(path)]
            if not matches or missing:
                raise ValueError(f"WebDataset shards not found: {missing or pattern}")
            self.shards.extend(matches)
        self._all_files = _files_hash(self.shards)  # of the whole source, kept by its shards

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.shards[0]!r}, ... {len(self.shards)} shards)"

    def shard(self, rank: int, world_size: int) -> "RecordSource":
        _check_shard(rank, world_size)
        if self._world_size > 1 or len(self.shards) < world_size:
            return super().shard(rank, world_size)
        if self._resumed is not None:
            raise ValueError(self._cannot_continue(f"its {world_size} shards here would each read whole tar files"))
        view = copy.copy(self)
        view.shards = self.shards[rank::world_size]
        view._position, view._epoch = 0, 0
        return view

    def continue_from(self, states: list[dict[str, Any]]) -> None:
        """As `RecordSource.continue_from`, for sources sharded per sample only: a position saved by shards that
        read whole tar files, or a shard here that does, cannot move to another sharding (ValueError)."""
        if _files_hash(self.shards) != self._all_files:
            raise ValueError(self._cannot_continue("its shards here read whole tar files"))
        if any(state.get("files", self._all_files) != self._all_files for state in states):
            raise ValueError(self._cannot_continue("the checkpoint's shards read whole tar files"))
        super().continue_from(states)

    def _cannot_continue(self, why: str) -> str:
        return (
            f"{self!r}: the data position cannot move to another number of processes or DataLoader workers because "
            f"{why} ({len(self.shards)} files; a source is split by whole tar files when it has at least as many as "
            "processes x workers, and such a position says which files were read, not which records). Resume with "
            "the number of processes and data.num_workers the checkpoint was written with, or start the data "
            "stream afresh"
        )

    def state_dict(self) -> dict[str, Any]:
        # The files a shard reads identify it as well as (rank, world_size) do.
        return {**super().state_dict(), "files": _files_hash(self.shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("files") != self.state_dict()["files"]:
            raise ValueError(
                f"{self!r}: state was saved for another set of tar files (other shards, processes or workers); "
                "resume with the same shards and the same number of processes and workers"
            )
        super().load_state_dict(state)

    def _stream(self, start: int, step: int) -> Iterator[RecordWithLocation]:
        index = -1
        for shard in self.shards:
            try:
                with tarfile.open(shard, "r|*") as tar:
                    files = (member for member in tar if member.isfile())
                    for key, members in itertools.groupby(
                        files, key=lambda member: _split_member_name(member.name)[0]
                    ):
                        index += 1
                        if index < start or (index - start) % step:
                            continue  # unread members are skipped by the stream
                        data = {_split_member_name(m.name)[1]: tar.extractfile(m).read() for m in members}
                        location = f"{shard}:{key}"
                        yield _sample_to_record(key, data, location), location
            except (tarfile.TarError, EOFError, OSError) as err:
                raise ValueError(f"{shard}: unreadable tar shard after sample {index} ({err})") from None


def _files_hash(shards: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()


def _sample_to_record(key: str, data: dict[str, bytes], location: str) -> Record:
    if "json" not in data:
        return _unusable(f"sample has no .json member (found extensions {sorted(data)})", "incomplete sample")
    record = _parse_json(data["json"])
    if "_error" in record:
        return record
    record.setdefault("id", key)
    record = _to_schema(record, location)
    if "_error" in record:
        return record
    base = posixpath.basename(key)
    images = sorted(ext for ext in data if ext.rpartition(".")[2].lower() in IMAGE_EXTENSIONS)
    named = record.get("image")
    if named is None:
        names = [f"{base}.{ext}" for ext in images]
        record["image"] = names[0] if len(names) == 1 else (names or None)
        extensions = images
    else:
        # Accept "png", "key.png" or "dir/key.png" for the member "dir/key.png".
        lookup = {alias: ext for ext in images for alias in (ext, f"{base}.{ext}", f"{key}.{ext}")}
        names = [named] if isinstance(named, str) else named
        unknown = [name for name in names if not isinstance(name, str) or name not in lookup]
        if unknown:
            reason = f"image(s) {unknown} not in the sample (its images: {images})"
            return _unusable(reason, "incomplete sample", id=record["id"])
        extensions = [lookup[name] for name in names]
    record["_image_bytes"] = [data[ext] for ext in extensions]
    return record


def _drop_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Columnar storage gives every row every column: ``None`` means "absent" in our schema (one level of nesting)."""
    record = {}
    for key, value in row.items():
        if value is None:
            continue
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            value = [{k: v for k, v in item.items() if v is not None} for item in value]
        record[key] = value
    return record


class HFDatasetSource(RecordSource):
    """Records from a Hugging Face dataset whose rows follow the schema.

    ``path`` is a ``save_to_disk`` folder, a parquet / JSON / JSONL file (or glob), or a hub name (needs internet).
    The ``image_column`` may be an ``Image()`` feature (or a list of them), whose encoded bytes are passed on
    undecoded, or strings: paths relative to ``image_root`` (default: the folder of ``path`` when it is local).
    """

    _FILE_BUILDERS: ClassVar[dict[str, str]] = {
        ".parquet": "parquet",
        ".json": "json",
        ".jsonl": "json",
        ".csv": "csv",
        ".arrow": "arrow",
    }

    def __init__(
        self,
        path: PathLike,
        split: str = "train",
        name: str | None = None,
        image_column: str = "image",
        image_root: PathLike | None = None,
        cache_dir: PathLike | None = None,
    ) -> None:
        super().__init__()
        import datasets  # heavy; only needed for this source

        self.label = f"{path}[{split}]"
        self.image_column = image_column
        local = Path(path)
        builder = self._FILE_BUILDERS.get(local.suffix.lower())
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"{path}: no split {split!r}; it has {list(dataset)}")
                dataset = dataset[split]
        elif builder is not None:
            files = {split: str(path)}
            dataset = datasets.load_dataset(builder, data_files=files, split=split, cache_dir=cache_dir)
        else:
            dataset = datasets.load_dataset(str(path), name, split=split, cache_dir=cache_dir)
        if image_root is None:
            # Local data: paths are relative to its folder; hub data: to the working directory.
            image_root = local if local.is_dir() else local.parent if builder is not None else Path()
        self.image_root = Path(image_root)
        if image_column in dataset.column_names:
            feature = dataset.features[image_column]
            # Keep images encoded: decoding happens once, in load_record_images, with EXIF handling.
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
            elif isinstance(getattr(feature, "feature", None), datasets.Image):
                dataset = dataset.cast_column(image_column, datasets.List(datasets.Image(decode=False)))
        self.dataset = dataset

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.label!r})"

    def __len__(self) -> int:
        """Rows in the dataset, whatever this view's shard."""
        return len(self.dataset)

    def _stream(self, start: int, step: int) -> Iterator[RecordWithLocation]:
        for index in range(start, len(self.dataset), step):
            location = f"{self.label}:{index}"
            yield _to_schema(self._row_to_record(dict(self.dataset[index])), location), location

    def _row_to_record(self, row: dict[str, Any]) -> Record:
        image = row.pop(self.image_column, None)
        record = _drop_nulls(row)
        record["_image_root"] = str(self.image_root)
        if image is None:
            return record
        if isinstance(image, str) or (isinstance(image, list) and all(isinstance(item, str) for item in image)):
            record["image"] = image
            return record
        # Image() features: {"bytes": ..., "path": ...}; bytes may be missing for datasets that store paths only.
        items = image if isinstance(image, list) else [image]
        names = [item.get("path") or f"{self.image_column}[{i}]" for i, item in enumerate(items)]
        record["image"] = names[0] if isinstance(image, dict) else names
        record["_image_bytes"] = [item.get("bytes") for item in items]
        return record


class MixtureSource:
    """An endless, seeded, weighted mixture: each step picks a member with probability proportional to its weight.

    A member that runs out starts its next pass. Choices depend only on ``(seed, step)`` (drawn in blocks), so a
    resumed mixture replays exactly; ``shard`` shards every member and keeps the choices, so ranks draw the same
    members in the same order from disjoint records.
    """

    _BLOCK = 4096  # choices drawn per seeded block

    def __init__(self, sources: Sequence[Source], weights: Sequence[float] | None = None, seed: int = 0) -> None:
        self.sources = list(sources)
        weights = [1.0] * len(self.sources) if weights is None else [float(w) for w in weights]
        if not self.sources or len(weights) != len(self.sources):
            raise ValueError(
                f"a mixture needs at least one source and one weight per source; got {len(self.sources)} "
                f"source(s) and {len(weights)} weight(s)"
            )
        if not all(w >= 0 and w < float("inf") for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be finite, non-negative and not all zero; got {weights}")
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.seed = seed
        self._step = 0
        self._resumed_step: int | None = None  # set by continue_from; shards start from it
        self._block_index, self._block = -1, []

    def __repr__(self) -> str:
        members = ", ".join(f"{source!r}: {weight:.3g}" for source, weight in zip(self.sources, self.weights))
        return f"MixtureSource({{{members}}}, seed={self.seed})"

    def _choice(self, step: int) -> int:
        block, offset = divmod(step, self._BLOCK)
        if block != self._block_index:
            # A string seed is hashed with SHA-512 by `random`, so blocks are the same on every run and machine.
            rng = random.Random(f"mixture:{self.seed}:{block}")
            self._block = rng.choices(range(len(self.sources)), weights=self.weights, k=self._BLOCK)
            self._block_index = block
        return self._block[offset]

    def __iter__(self) -> Iterator[RecordWithLocation]:
        iterators = [iter(source) for source in self.sources]
        while True:
            member = self._choice(self._step)
            pair = next(iterators[member], None)
            if pair is None:  # the member finished a pass: start the next one
                iterators[member] = iter(self.sources[member])
                pair = next(iterators[member], None)
                if pair is None:
                    raise ValueError(f"mixture member {self.sources[member]!r} yields no records (for this shard)")
            self._step += 1
            yield pair

    @property
    def continuing(self) -> bool:
        """Whether a member still skips records an earlier run took (`continue_from`)."""
        return any(getattr(source, "continuing", False) for source in self.sources)

    def shard(self, rank: int, world_size: int) -> "MixtureSource":
        _check_shard(rank, world_size)
        view = MixtureSource([source.shard(rank, world_size) for source in self.sources], self.weights, self.seed)
        if self._resumed_step is not None:
            view._step = view._resumed_step = self._resumed_step
        return view

    def continue_from(self, states: list[dict[str, Any]]) -> None:
        """Continue a run with another sharding from the states of all its shards: each member continues from its
        shards' states (`RecordSource.continue_from`), so no member repeats or misses a record; the choices
        continue from the smallest step of any earlier shard (shards drift apart, by their bad records, so no one
        step continues them all; the members drawn from then on follow the seed and weights as before)."""
        if not states or any(len(state["sources"]) != len(self.sources) for state in states):
            raise ValueError(f"{self!r}: continue_from needs the states of the earlier run's shards, each with "
                             f"{len(self.sources)} mixture members")
        for index, source in enumerate(self.sources):
            source.continue_from([state["sources"][index] for state in states])
        self._step = self._resumed_step = min(state["step"] for state in states)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "sources": [source.state_dict() for source in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(
                f"state has {len(state['sources'])} mixture members, this mixture has {len(self.sources)}"
            )
        self._step = state["step"]
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)


class TaskFilter:
    """The records of ``source`` whose ``task`` is one of ``tasks`` (e.g. an ablation without the region records);
    the others are read past, neither yielded nor counted, and unparseable records still come through (to be
    reported). Sharding, positions and `continue_from` are the wrapped source's; it has no length (the records
    kept are known only once read), so `train.epochs` needs an unfiltered source."""

    def __init__(self, source: Source, tasks: Sequence[str]) -> None:
        self.source = source
        self.tasks = frozenset(tasks)

    def __repr__(self) -> str:
        return f"{self.source!r} (tasks {sorted(self.tasks)})"

    def __iter__(self) -> Iterator[RecordWithLocation]:
        for record, location in self.source:
            if "_error" in record or record.get("task") in self.tasks:
                yield record, location

    def shard(self, rank: int, world_size: int) -> "TaskFilter":
        return TaskFilter(self.source.shard(rank, world_size), self.tasks)

    @property
    def epoch(self) -> int:
        return getattr(self.source, "epoch", 0)

    @property
    def continuing(self) -> bool:
        return getattr(self.source, "continuing", False)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def continue_from(self, states: list[dict[str, Any]]) -> None:
        self.source.continue_from(states)


# ---------------------------------------------------------------- configs: what a YAML file's data.train / data.eval say


@dataclass
class JsonlSourceConfig:
    """``{type: jsonl, path, image_root}``: a `JsonlSource`."""

    type: ClassVar[str] = "jsonl"
    path: str
    image_root: str | None = None
    tasks: list[str] | None = None  # keep only records of these tasks (`TaskFilter`)


@dataclass
class WebDatasetSourceConfig:
    """``{type: webdataset, shards}``: a `WebDatasetSource`; ``shards`` is a glob or a list of paths / globs."""

    type: ClassVar[str] = "webdataset"
    shards: str | list[str]
    tasks: list[str] | None = None


@dataclass
class HFDatasetSourceConfig:
    """``{type: hf, path, split, name, image_column, image_root, cache_dir}``: an `HFDatasetSource`."""

    type: ClassVar[str] = "hf"
    path: str  # a local folder / file / glob, or a hub name ("org/name")
    split: str = "train"
    name: str | None = None
    image_column: str = "image"
    image_root: str | None = None
    cache_dir: str | None = None
    tasks: list[str] | None = None


@dataclass
class MixtureSourceConfig:
    """``{type: mixture, sources: [...], weights, seed}``: a `MixtureSource` of the member sources."""

    type: ClassVar[str] = "mixture"
    sources: list["SourceConfig"]
    weights: list[float] | None = None  # None: equal weights
    seed: int = 0


# A data source config; its ``type`` (a class attribute, written first in YAML) says which.
SourceConfig = JsonlSourceConfig | WebDatasetSourceConfig | HFDatasetSourceConfig | MixtureSourceConfig


def describe_source(config: SourceConfig) -> str:
    """A short description of a source for model cards: its type and paths (the card writer shortens local paths)."""
    if isinstance(config, MixtureSourceConfig):
        parts = ", ".join(describe_source(source) for source in config.sources)
        return f"mixture of {parts} (weights {config.weights or 'equal'})"
    locations = getattr(config, "path", None) or getattr(config, "shards", "")
    locations = locations if isinstance(locations, list) else [locations]
    return f"{config.type} `{', '.join(map(str, locations))}`"


def resolve_source_paths(config: SourceConfig, base_dir: PathLike | None = None) -> SourceConfig:
    """A copy of ``config`` whose local paths are absolute: ``~`` expanded, relative paths joined to ``base_dir``
    (default: the working directory). An hf ``path`` that matches nothing locally is a hub name ("org/name") and
    stays as written."""

    def local(path: PathLike) -> str:
        return str(Path(base_dir or os.getcwd(), Path(path).expanduser()).resolve())

    def optional(path: PathLike | None) -> str | None:
        return None if path is None else local(path)

    if isinstance(config, MixtureSourceConfig):
        return dataclasses.replace(config, sources=[resolve_source_paths(s, base_dir) for s in config.sources])
    if isinstance(config, WebDatasetSourceConfig):
        shards = config.shards
        return dataclasses.replace(config, shards=local(shards) if isinstance(shards, (str, os.PathLike)) else list(map(local, shards)))
    if isinstance(config, JsonlSourceConfig):
        return dataclasses.replace(config, path=local(config.path), image_root=optional(config.image_root))
    path = local(config.path)
    return dataclasses.replace(
        config, path=path if glob.glob(path) else config.path, image_root=optional(config.image_root),
        cache_dir=optional(config.cache_dir),
    )


def build_source(config: SourceConfig | dict[str, Any], base_dir: PathLike | None = None) -> Source:
    """The source a config describes: a `SourceConfig` or its YAML form, e.g. ``{"type": "jsonl", "path": "x.jsonl"}``.

    Relative local paths resolve against ``base_dir`` (default: the working directory); see `resolve_source_paths`.
    """
    if not isinstance(config, SourceConfig):
        config = from_mapping(SourceConfig, config, "source")
    config = resolve_source_paths(config, base_dir)
    if isinstance(config, MixtureSourceConfig):
        return MixtureSource([build_source(member) for member in config.sources], config.weights, config.seed)
    if isinstance(config, WebDatasetSourceConfig):
        source = WebDatasetSource(config.shards)
    elif isinstance(config, JsonlSourceConfig):
        source = JsonlSource(config.path, config.image_root)
    else:
        source = HFDatasetSource(**{k: v for k, v in dataclasses.asdict(config).items() if k != "tasks"})
    return source if config.tasks is None else TaskFilter(source, config.tasks)


__all__ = [
    "HFDatasetSource",
    "HFDatasetSourceConfig",
    "JsonlSource",
    "JsonlSourceConfig",
    "MixtureSource",
    "MixtureSourceConfig",
    "RecordSource",
    "Source",
    "SourceConfig",
    "TaskFilter",
    "WebDatasetSource",
    "WebDatasetSourceConfig",
    "build_source",
    "describe_source",
    "resolve_source_paths",
]
