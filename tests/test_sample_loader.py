"""The training stream through DataLoader workers: same samples and counts as in-process, each worker reads only its
share (whole tar files), and an exact resume mid-pass and across a pass end."""

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from finevit_vl.data import JsonlSource, WebDatasetSource
from finevit_vl.data.collator import SampleEncoder
from finevit_vl.tiny import build_tiny_model
from finevit_vl.train.data import BadRecordLog, TrainStream


CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model(max_pixels=56 * 56)[1]


def _record(i: int) -> dict:
    return {"id": f"r{i}", "image": "red.png", "task": "caption", "caption": f"a red square number {i}"}


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loader")
    Image.new("RGB", (56, 56), "red").save(folder / "red.png")
    lines = [json.dumps(_record(i)) for i in range(10)]
    lines.insert(3, json.dumps({"id": "gone", "image": "nowhere.png", "task": "caption", "caption": "x"}))
    lines.insert(8, "{broken json")
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")  # 12 records, 10 usable
    return path


def _stream(source, processor, workers: int) -> TrainStream:
    encoder = SampleEncoder(processor, max_length=96)
    return TrainStream(source, encoder, samples_per_step=2, micro_batch_size=2, pack=False,
                       pad_token_id=processor.tokenizer.pad_token_id, bad_records=BadRecordLog(None),
                       num_workers=workers)


def _ids(step) -> list[list[int]]:
    return [row.tolist() for micro_batch in step.micro_batches for row in micro_batch["input_ids"]]


def _counts(state: dict) -> tuple:
    return state["records_read"], state["records_skipped"], state["bad_records"], state["bad_locations"]


def test_workers_give_the_in_process_samples_and_counts(jsonl, processor):
    serial, parallel = _stream(JsonlSource(jsonl), processor, 0), _stream(JsonlSource(jsonl), processor, 2)
    for _ in range(5):  # one pass: 12 records read, 10 samples
        expected, got = serial.next_step(), parallel.next_step()
        assert _ids(got) == _ids(expected)
        assert torch.equal(got.micro_batches[0]["pixel_values"], expected.micro_batches[0]["pixel_values"])
        assert _counts(got.state) == _counts(expected.state)
    assert got.state["records_read"] == 12 and got.state["bad_records"] == 2


@pytest.mark.reliability("data loader", "resume with 2 DataLoader workers mid-pass and across a pass end",
                         "the same next samples and counts; another worker count refused")
def test_resume_with_workers_is_exact(jsonl, processor):
    first = _stream(JsonlSource(jsonl), processor, 2)
    steps = [first.next_step() for _ in range(9)]  # 18 samples: into the second pass
    state = json.loads(json.dumps(steps[2].state))  # mid-pass, through JSON as checkpoints store it

    resumed = _stream(JsonlSource(jsonl), processor, 2)
    resumed.load_state_dict(state)
    for expected in steps[3:]:
        got = resumed.next_step()
        assert _ids(got) == _ids(expected)
        assert _counts(got.state) == _counts(expected.state)
    assert resumed.passes == 1 and first.passes == 1

    with pytest.raises(ValueError, match="num_workers=2 but this run has 1"):
        _stream(JsonlSource(jsonl), processor, 1).load_state_dict(state)


def _write_shard(path: Path, ids: list[int]) -> str:
    image = io.BytesIO()
    Image.new("RGB", (56, 56), "red").save(image, format="PNG")
    with tarfile.open(path, "w") as tar:
        for i in ids:
            record = {k: v for k, v in _record(i).items() if k != "image"}
            for extension, data in (("json", json.dumps(record).encode()), ("png", image.getvalue())):
                member = tarfile.TarInfo(f"s{i:03d}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return str(path)


def test_ranks_and_workers_read_only_their_own_tar_files(tmp_path, processor):
    files = [_write_shard(tmp_path / f"shard-{n}.tar", list(range(3 * n, 3 * n + 3))) for n in range(4)]
    source = WebDatasetSource(str(tmp_path / "shard-*.tar"))
    rank_share = source.shard(0, 2)  # rank 0 of 2: files 0 and 2
    assert rank_share.shards == [files[0], files[2]]
    assert [rank_share.shard(w, 2).shards for w in range(2)] == [[files[0]], [files[2]]]

    stream = _stream(rank_share, processor, 2)
    texts = [processor.tokenizer.decode(row) for _ in range(3) for row in _ids(stream.next_step())]
    numbers = [int(re.search(r"number (\d+)", text).group(1)) for text in texts]
    # Worker 0 reads file 0 (records 0-2), worker 1 file 2 (6-8); their results alternate in a fixed order.
    assert numbers == [0, 6, 1, 7, 2, 8]
    assert len({state["source"]["files"] for state in _worker_states(stream)}) == 2


def _worker_states(stream: TrainStream) -> list[dict]:
    from finevit_vl.train.loader import dataset_states

    return dataset_states(stream.loader.state_dict())


def test_epochs_set_the_step_budget(jsonl, tmp_path, processor):
    from finevit_vl.train.__main__ import steps_for_epochs
    from finevit_vl.train.config import load_config

    config = load_config(CONFIGS / "tiny_cpu_stage3.yaml", ["train.epochs=2", "train.global_batch_size=5"])
    assert steps_for_epochs(config, JsonlSource(jsonl)) == 5  # 2 x 12 records / 5 per step, rounded up
    stream = _stream(JsonlSource(jsonl), processor, 2)  # 2 samples per step
    for _ in range(12):  # 24 samples: 2 passes of the 10 usable records, plus 4
        stream.next_step()
    assert stream.passes == 2
    tar = _write_shard(tmp_path / "one.tar", [0])
    with pytest.raises(ValueError, match="train.epochs needs a data.train source whose records can be counted"):
        steps_for_epochs(config, WebDatasetSource(tar))
