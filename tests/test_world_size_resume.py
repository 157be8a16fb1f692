"""Resuming the data position on another number of processes and/or DataLoader workers (`continue_from`): every
record of a pass is read once over the old and the new run, across pass ends, chained resumes and mixtures; a
WebDataset split by whole tar files refuses with what to do."""

import collections
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from finevit_vl.data import BadRecordError, JsonlSource, MixtureSource, WebDatasetSource
from finevit_vl.train.data import BadRecordLog, TrainStream


NUM_RECORDS = 23
BAD_LINES = (3, 8, 15)  # malformed JSON at these record indices


@dataclass
class _Sample:
    """Stands in for an `EncodedSample`: which record, in which pass."""

    id: str
    epoch: int
    length: int = 1
    num_images: int = 0
    num_patches: int = 0


class _Encoder:
    """No images, no tokenizer: a record becomes its id (bad records raise as the real encoder does)."""

    max_length = None

    def encode_record(self, record: dict, location: str, epoch: int = 0) -> _Sample:
        if "_error" in record:
            raise BadRecordError(location, record["_error"], record["_error_kind"])
        return _Sample(record["id"], epoch)


class _Batcher:
    def micro_batches(self, samples):
        return [{"samples": [(sample.id, sample.epoch) for sample in samples]}]

    @staticmethod
    def num_targets(samples, micro_batches):
        return len(samples)

    @staticmethod
    def num_slots(micro_batches):
        return 0

    @staticmethod
    def step_counts(samples):
        return {}


def _record(i: int) -> dict:
    return {"id": f"r{i}", "image": "red.png", "task": "caption", "caption": f"number {i}"}


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "train.jsonl"
    lines = ["{broken json" if i in BAD_LINES else json.dumps(_record(i)) for i in range(NUM_RECORDS)]
    path.write_text("\n".join(lines) + "\n")
    return path


USABLE = {f"r{i}" for i in range(NUM_RECORDS) if i not in BAD_LINES}


def _streams(path: Path, world: int, workers: int = 0, samples_per_step: int = 2) -> list[TrainStream]:
    source = JsonlSource(path)
    return [TrainStream(source.shard(rank, world), _Encoder(), samples_per_step, samples_per_step, False, 0,
                        BadRecordLog(None, rank), num_workers=workers, batcher=_Batcher())
            for rank in range(world)]


def _run(streams: list[TrainStream], steps: int | list[int]) -> tuple[list[tuple[str, int]], list[dict]]:
    """The (id, pass) of every sample the ranks take in `steps` steps (per rank: ranks drift apart in the records
    they read), and each rank's state after the last one (through JSON, as checkpoints store it)."""
    seen, states = [], []
    for stream, rank_steps in zip(streams, steps if isinstance(steps, list) else [steps] * len(streams)):
        for _ in range(rank_steps):
            step = stream.next_step()
            assert step.stop_reason is None
            seen += step.micro_batches[0]["samples"]
        states.append(json.loads(json.dumps(step.state)))
    return seen, states


def _continue(path: Path, states: list[dict], world: int, workers: int = 0) -> list[TrainStream]:
    streams = _streams(path, world, workers)
    for rank, stream in enumerate(streams):
        stream.continue_from(states, rank)
    return streams


def _assert_each_once(seen: list[tuple[str, int]], streams: list[TrainStream], first_pass: int = 0) -> int:
    """Every usable record once in each pass all new ranks have finished, none twice in the pass under way; returns
    the number of finished passes."""
    finished = min(stream.passes for stream in streams)
    by_pass = collections.defaultdict(collections.Counter)
    for record_id, epoch in seen:
        by_pass[epoch][record_id] += 1
    for epoch in range(first_pass, finished):
        assert by_pass[epoch] == collections.Counter(USABLE), f"pass {epoch}"
    for epoch in by_pass:
        assert max(by_pass[epoch].values()) == 1, f"pass {epoch} repeats {by_pass[epoch].most_common(2)}"
    return finished


def _ledger(streams: list[TrainStream]) -> tuple[int, int, set[str]]:
    states = [stream.state_dict() for stream in streams]
    return (sum(s["records_read"] for s in states), sum(s["records_skipped"] for s in states),
            {key for s in states for key in s["bad_locations"]})


@pytest.mark.parametrize(("old_world", "old_steps", "new_world"), [(2, 3, 1), (1, 4, 2), (3, 2, 2), (2, 5, 3)])
def test_another_world_size_reads_each_record_once_per_pass(jsonl, old_world, old_steps, new_world):
    before, states = _run(_streams(jsonl, old_world), old_steps)
    new = _continue(jsonl, states, new_world)
    after, _ = _run(new, 16)
    assert _assert_each_once(before + after, new) >= 2
    # The ledger: rank 0 took the merged one, so the totals over ranks carry on.
    read, skipped, bad = _ledger(new)
    assert read == len(before) + len(after) + skipped
    assert len(bad) == len(BAD_LINES)
    assert {key for state in states for key in state["bad_locations"]} <= set(new[0].bad_records.records)


@pytest.mark.reliability("data loader", "resume on another world size with ranks in different passes",
                         "each record once per pass: the ranks behind finish their pass, nothing is read twice")
def test_ranks_in_different_passes(jsonl):
    # Rank 1 of 2 has fewer usable records (2 bad of 11 against 1 of 12): after 5 steps of 2 it is in pass 1.
    old = _streams(jsonl, 2)
    before, states = _run(old, 5)
    assert [stream.passes for stream in old] == [0, 1]
    for new_world in (1, 2, 3):
        new = _continue(jsonl, states, new_world)
        assert min(stream.passes for stream in new) == 0  # the new shards start in the earliest pass
        after, _ = _run(new, 12)
        assert _assert_each_once(before + after, new) >= 2, new_world


def test_chained_resume_and_exact_resume_of_a_continued_stream(jsonl):
    before, states = _run(_streams(jsonl, 2), [1, 4])  # rank 1 far ahead: the next run has much to skip
    single = _continue(jsonl, states, 1)
    middle, middle_states = _run(single, 1)  # still skipping: the skip list is in the state
    assert "skip" in middle_states[0]["loader"]["dataset_state"]["source"]

    # The same world size: load_state_dict resumes exactly, the pending skips included.
    exact = _streams(jsonl, 1)
    exact[0].load_state_dict(middle_states[0])
    expected, _ = _run(single, 6)
    got, _ = _run(exact, 6)
    assert got == expected

    # 2 -> 1 -> 2: what the second run must still skip carries over to the third.
    third = _continue(jsonl, middle_states, 2)
    after, _ = _run(third, 14)
    assert _assert_each_once(before + middle + after, third) >= 2


@pytest.mark.reliability("data loader", "resume 2 ranks x 2 DataLoader workers on 1 rank without workers, and back",
                         "each record once per pass; over-long records stay known")
def test_workers_to_no_workers_and_back(jsonl):
    old = _streams(jsonl, 2, workers=2)
    before, states = _run(old, 3)
    new = _continue(jsonl, states, 1, workers=0)
    after, new_states = _run(new, 9)
    assert _assert_each_once(before + after, new) >= 1
    # ... and 1 rank without workers -> 1 rank with 2: the workers inherit what to skip.
    again = _continue(jsonl, new_states, 1, workers=2)
    more, _ = _run(again, 9)
    assert _assert_each_once(before + after + more, again) >= 2


def test_continue_from_needs_every_shard(jsonl):
    _, states = _run(_streams(jsonl, 2), 1)
    with pytest.raises(ValueError, match="every shard .* do not cover the stream exactly once"):
        _continue(jsonl, states[:1], 1)
    with pytest.raises(ValueError, match="do not cover the stream exactly once"):
        _continue(jsonl, states + states[:1], 1)


def test_source_level_skip_survives_shard(jsonl):
    source = JsonlSource(jsonl)
    ranks = [source.shard(rank, 2) for rank in range(2)]
    taken = [[next(it)[1] for _ in range(n)] for it, n in zip(map(iter, ranks), (4, 7))]
    resumed = JsonlSource(jsonl)
    resumed.continue_from([rank.state_dict() for rank in ranks])
    assert resumed.continuing
    workers = [resumed.shard(w, 3) for w in range(3)]
    rest = [location for worker in workers for _, location in worker]
    everything = [location for _, location in JsonlSource(jsonl)]
    assert sorted(taken[0] + taken[1] + rest) == sorted(everything)
    assert not any(worker.continuing for worker in workers)  # past the pass: the skip list is dropped
    assert all("skip" not in worker.state_dict() for worker in workers)


def _write_tar(path: Path, ids: list[int]) -> str:
    with tarfile.open(path, "w") as tar:
        for i in ids:
            data = json.dumps({"caption": f"number {i}", "task": "caption"}).encode()
            member = tarfile.TarInfo(f"s{i:03d}.json")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return str(path)


def test_webdataset_split_by_tar_files_refuses(tmp_path):
    for n in range(2):
        _write_tar(tmp_path / f"shard-{n}.tar", list(range(3 * n, 3 * n + 3)))
    pattern = str(tmp_path / "shard-*.tar")
    by_file = [WebDatasetSource(pattern).shard(rank, 2) for rank in range(2)]  # 2 files, 2 ranks: whole files
    states = [share.state_dict() for share in by_file]
    with pytest.raises(ValueError, match="cannot move to another number of processes or DataLoader workers because "
                                         "the checkpoint's shards read whole tar files.*Resume with the number"):
        WebDatasetSource(pattern).continue_from(states)
    # Per-sample shards (4 ranks, 2 files) continue fine on one process, but not over 2 workers reading whole files.
    per_sample = [WebDatasetSource(pattern).shard(rank, 4) for rank in range(4)]
    next(iter(per_sample[0]))
    whole = WebDatasetSource(pattern)
    whole.continue_from([share.state_dict() for share in per_sample])
    assert len(list(whole)) == 5
    resumed = WebDatasetSource(pattern)
    resumed.continue_from([share.state_dict() for share in per_sample])
    with pytest.raises(ValueError, match="its 2 shards here would each read whole tar files"):
        resumed.shard(0, 2)
    with pytest.raises(ValueError, match="its shards here read whole tar files"):
        WebDatasetSource(pattern).shard(1, 2).continue_from([WebDatasetSource(pattern).state_dict()])


def test_mixture_continue_from_reads_each_member_record_once(tmp_path):
    paths = []
    for name, count in (("a", 23), ("b", 7)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**_record(i), "id": f"{name}{i}"}) + "\n" for i in range(count)))
        paths.append(path)

    def mixture() -> MixtureSource:
        return MixtureSource([JsonlSource(path) for path in paths], [3, 1], seed=1)

    def take(source: MixtureSource, n: int) -> list[tuple[str, int]]:
        out, iterator = [], iter(source)
        for _ in range(n):
            record, _ = next(iterator)
            member = source.sources["ab".index(record["id"][0])]
            out.append((record["id"], member.epoch))
        return out

    old = [mixture().shard(rank, 2) for rank in range(2)]
    seen = take(old[0], 9) + take(old[1], 5)
    states = json.loads(json.dumps([share.state_dict() for share in old]))
    new = mixture()
    new.continue_from(states)
    assert new.state_dict()["step"] == 5  # the smallest step of the earlier shards
    in_worker = new.shard(0, 1)  # as a DataLoader worker's share: the same skips, from the same step
    seen += take(new, 80)
    assert [record_id for record_id, _ in take(in_worker, 80)] == [record_id for record_id, _ in seen[-80:]]
    for name, count, member in (("a", 23, new.sources[0]), ("b", 7, new.sources[1])):
        by_pass = collections.defaultdict(collections.Counter)
        for record_id, epoch in seen:
            if record_id.startswith(name):
                by_pass[epoch][record_id] += 1
        assert member.epoch >= 1
        for epoch in range(member.epoch):
            assert by_pass[epoch] == collections.Counter(f"{name}{i}" for i in range(count)), (name, epoch)
        assert max(by_pass[member.epoch].values(), default=1) == 1


def test_a_pass_wholly_read_before_is_skipped_within_one_iteration(jsonl):
    ranks = [JsonlSource(jsonl).shard(rank, 2) for rank in range(2)]
    first = iter(ranks[0])
    for _ in range(12):  # all 12 records of rank 0, without starting its next pass
        next(first)
    assert len(list(ranks[1])) == 11  # all 11 of rank 1, and 2 of its next pass
    second = iter(ranks[1])
    next(second), next(second)
    assert [(r.state_dict()["position"], r.epoch) for r in ranks] == [(12, 0), (2, 1)]
    resumed = JsonlSource(jsonl).shard(0, 2)
    resumed.continue_from([rank.state_dict() for rank in ranks])
    assert resumed.epoch == 0
    # Pass 0 of rank 0's records was read whole: one iteration skips it and reads pass 1, so it is not empty.
    assert [location for _, location in resumed] == [f"{jsonl}:{i + 1}" for i in range(0, NUM_RECORDS, 2)]
    assert resumed.epoch == 2 and not resumed.continuing
    behind = JsonlSource(jsonl).shard(1, 2)
    behind.continue_from([rank.state_dict() for rank in ranks])
    assert behind.epoch == 1  # pass 0 of its records was wholly read: it starts in pass 1, after 2 records
    assert len(list(behind)) == 11 - 2 and behind.epoch == 2
