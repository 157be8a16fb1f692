"""Bad training data: the count and fraction limits (checked after every record, never overshot), the summary by
reason with file:line examples, over-long records tokenized once, and exact counts across a resume."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from finevit_vl.data import BadRecordError, JsonlSource
from finevit_vl.data.collator import SampleEncoder
from finevit_vl.tiny import build_tiny_model
from finevit_vl.train.data import (
    BadRecordLimit,
    BadRecordLog,
    Prefetcher,
    TrainStream,
    format_bad_record_summary,
    merge_summaries,
    summarize_bad_records,
    write_bad_record_summary,
)


MAX_LENGTH = 96


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model(max_pixels=56 * 56)[1]


def _good(i: int) -> dict:
    return {"id": f"ok{i}", "image": "ok.png", "task": "caption", "caption": f"a red square {i}"}


def _missing(i: int) -> dict:
    return {"id": f"missing{i}", "image": "nowhere.png", "task": "caption", "caption": "x"}


def _write(folder: Path, lines: list[dict | str]) -> Path:
    Image.new("RGB", (56, 56), "red").save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    path = folder / "train.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _stream(path: Path, processor, limit: BadRecordLimit | None, log_path: Path | None = None, samples: int = 2):
    encoder = SampleEncoder(processor, max_length=MAX_LENGTH)
    return TrainStream(JsonlSource(path), encoder, samples_per_step=samples, micro_batch_size=1, pack=False,
                       pad_token_id=processor.tokenizer.pad_token_id, bad_records=BadRecordLog(log_path), limit=limit)


@pytest.mark.reliability("bad data", "90% bad records", "stops once the fraction passes data.max_bad_fraction, "
                         "naming skipped/read and bad_records.jsonl")
def test_mostly_bad_data_stops_on_the_fraction(tmp_path, processor):
    path = _write(tmp_path, [_good(i) if i % 10 == 0 else _missing(i) for i in range(300)])
    limit = BadRecordLimit(max_count=None, max_fraction=0.1, min_records=50, log_path=tmp_path / "bad_records.jsonl")
    prefetcher = Prefetcher(_stream(path, processor, limit), depth=2, num_steps=100)
    try:
        batches = [prefetcher.next() for _ in range(10)]
    finally:
        prefetcher.close()
    stops = [batch for batch in batches if batch.stop_reason is not None]
    assert stops and all(batch.stop_reason is None and batch.num_samples == 2 for batch in batches[: -len(stops)])
    stop = stops[0]
    # Checked after every record: the stop comes on the very record where the fraction first applies.
    assert stop.state["records_read"] == 50 and stop.state["records_skipped"] == 45
    assert stop.stop_reason.startswith("45 of 50 records read were skipped (90.0%), over data.max_bad_fraction=0.1")
    assert str(tmp_path / "bad_records.jsonl") in stop.stop_reason
    assert not stop.micro_batches and stop.num_samples == 0
    assert all(batch is stop for batch in stops)  # the prefetch thread stopped; the same stop is handed out again


@pytest.mark.reliability("bad data", "count limit 5", "stops at exactly 6 bad records, reporting 6")
def test_count_limit_is_never_overshot(tmp_path, processor):
    path = _write(tmp_path, [record for i in range(20) for record in (_good(i), _missing(i), _missing(100 + i))])
    log_path = tmp_path / "bad_records.jsonl"
    stream = _stream(path, processor, BadRecordLimit(max_count=5, max_fraction=None), log_path, samples=4)
    batch = stream.next_step()
    while batch.stop_reason is None:
        batch = stream.next_step()
    assert batch.stop_reason.startswith("6 bad records skipped, over data.max_bad_records=5")
    assert batch.state["bad_records"] == 6 and len(log_path.read_text().splitlines()) == 6
    assert stream.next_step().stop_reason == batch.stop_reason  # it reads no further
    assert stream.bad_records.records_read == 9


def test_limit_messages_and_validation():
    limit = BadRecordLimit(max_count=None, max_fraction=0.5, min_records=10)
    assert limit.exceeded(bad_records=9, records_skipped=9, records_read=9) is None  # too few read yet
    assert limit.exceeded(bad_records=5, records_skipped=5, records_read=10) is None  # not over
    assert "6 of 10 records read were skipped (60.0%)" in limit.exceeded(6, 6, 10)
    assert BadRecordLimit(None, None).exceeded(10**6, 10**6, 10**6) is None
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadRecordLimit(max_fraction=1.5)


@pytest.mark.reliability("bad data", "end-of-run summary", "skipped records by reason with file:line examples, "
                         "written to bad_records_summary.json")
def test_summary_by_reason_with_file_line_examples(tmp_path, processor):
    records = [
        _good(0), _missing(1), _missing(2), _missing(3), _missing(4),
        {"id": "undecodable", "image": "broken.png", "task": "caption", "caption": "x"},
        {"id": "outside", "image": "ok.png", "task": "grounding", "grounding": [{"expression": "it", "box": [10, 10, 90, 40]}]},
        {"id": "toolong", "image": "ok.png", "task": "caption", "caption": "red " * 200},
        "{not json",
        {"id": "nocaption", "image": "ok.png", "task": "caption"},
        _good(1),
    ]
    path = _write(tmp_path, records)
    stream = _stream(path, processor, BadRecordLimit(None, None), samples=2)
    state = stream.next_step().state
    summary = stream.bad_records.summary()
    assert (summary["records_read"], summary["records_skipped"], summary["bad_records"]) == (11, 9, 9)
    assert summary["skipped_fraction"] == pytest.approx(9 / 11)
    counts = {kind: entry["count"] for kind, entry in summary["by_reason"].items()}
    assert counts == {"image not found": 4, "box outside image": 1, "cannot decode image": 1, "malformed JSON": 1,
                      "schema": 1, "too long": 1}
    assert list(counts) == sorted(counts, key=lambda kind: (-counts[kind], kind))  # most frequent first
    missing = summary["by_reason"]["image not found"]["examples"]
    assert [example["location"].split(" ")[0] for example in missing] == [f"{path}:{line}" for line in (2, 3, 4)]
    assert summary["by_reason"]["malformed JSON"]["examples"] == [
        {"location": f"{path}:9", "reason": "malformed JSON (Expecting property name enclosed in double quotes at column 2)"}
    ]
    assert "caption" in summary["by_reason"]["schema"]["examples"][0]["reason"]

    merged = merge_summaries([summary, summary])  # two ranks
    assert merged["bad_records"] == 18 and merged["records_read"] == 22
    assert merged["by_reason"]["image not found"]["count"] == 8 and len(merged["by_reason"]["image not found"]["examples"]) == 3
    written = write_bad_record_summary([summary], tmp_path)
    assert json.loads((tmp_path / "bad_records_summary.json").read_text()) == written == summary
    table = format_bad_record_summary(summary)
    assert table.splitlines()[0] == "bad records: 9 distinct, 9 of 11 records read skipped (81.8%)"
    assert f"image not found            4  {path}:2 (id=missing1)" in table and table.count(", ...") == 1
    assert format_bad_record_summary(merge_summaries([])) == "bad records: none among 0 records read"
    assert state["bad_locations"][f"train:{path}:8 (id=toolong)"][0] == "too long"


def test_kind_falls_back_to_the_reason():
    assert BadRecordError("a.jsonl:1", "image file not found: x.png").kind == "image not found"
    assert BadRecordError("a.jsonl:1", "cannot decode image (truncated)").kind == "cannot decode image"
    assert BadRecordError("a.jsonl:1", "refused as a possible decompression bomb: 9x9").kind == "decompression bomb"
    assert BadRecordError("a.jsonl:1", "something new").kind == "other"
    assert BadRecordError("a.jsonl:1", "something new", "schema").kind == "schema"


@pytest.mark.reliability("bad data", "over-long record, 3 passes", "tokenized once, then skipped without decoding")
def test_over_long_record_is_encoded_once_over_three_passes(tmp_path, processor, monkeypatch):
    path = _write(tmp_path, [{"id": "toolong", "image": "ok.png", "task": "caption", "caption": "red " * 2000},
                             *(_good(i) for i in range(4))])
    stream = _stream(path, processor, BadRecordLimit(None, None), samples=4)
    calls = Counter()
    encode_record = stream.encoder.encode_record

    def counting(record, location, epoch=0):
        calls[record.get("id")] += 1
        return encode_record(record, location, epoch)

    monkeypatch.setattr(stream.encoder, "encode_record", counting)
    states = [stream.next_step().state for _ in range(3)]
    assert stream.passes == 2 and calls == {"toolong": 1, "ok0": 3, "ok1": 3, "ok2": 3, "ok3": 3}
    assert (states[-1]["records_read"], states[-1]["records_skipped"], states[-1]["bad_records"]) == (15, 3, 1)
    assert stream.too_long == {f"{path}:1"}


@pytest.mark.reliability("bad data", "resume", "counts, reasons and known over-long records restored exactly")
def test_state_round_trip_keeps_counts_reasons_and_too_long(tmp_path, processor):
    records = [{"id": "toolong", "image": "ok.png", "task": "caption", "caption": "red " * 200}, _missing(0),
               *(_good(i) for i in range(3)), "{not json"]
    path = _write(tmp_path, records)
    first = _stream(path, processor, BadRecordLimit(None, None))
    steps = [first.next_step() for _ in range(4)]
    state = json.loads(json.dumps(steps[1].state))  # JSON, as checkpoints store it

    resumed = _stream(path, processor, BadRecordLimit(None, None))
    resumed.load_state_dict(state)
    assert resumed.too_long == {f"{path}:1"} and resumed.bad_records.summary() == summarize_bad_records(state)
    encoded = []
    encode_record = resumed.encoder.encode_record
    resumed.encoder.encode_record = lambda record, location, epoch=0: (
        encoded.append(record.get("id")) or encode_record(record, location, epoch)
    )
    for expected in steps[2:]:
        got = resumed.next_step()
        assert torch.equal(got.micro_batches[0]["input_ids"], expected.micro_batches[0]["input_ids"])
        assert json.loads(json.dumps(got.state)) == json.loads(json.dumps(expected.state))
    assert resumed.passes >= 1 and "toolong" not in encoded  # known from before the resume
    assert resumed.bad_records.summary() == first.bad_records.summary()

    legacy = BadRecordLog(None)  # checkpoints written before counts and reasons were kept
    legacy.load_state_dict({"bad_locations": ["train:a.jsonl:1", "train:a.jsonl:2"], "bad_records": 2})
    assert legacy.count == 2 and legacy.summary()["by_reason"]["other"]["count"] == 2
