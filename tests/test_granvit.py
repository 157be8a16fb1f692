"""GranViT in the next-token stages: region turns by direction, box crops collated for images of different sizes in
one packed row, region self-distillation as its own loss term with an EMA teacher that resumes bitwise, and the
two-phase schedule as two configs."""

import json
from pathlib import Path

import pytest
import torch
from conftest import random_image
from safetensors.torch import load_file
from test_train_e2e import CONFIGS, _launch_cmd, _metrics, _run, _step_losses

from finevit_vl.data.collator import RegionCrops, SampleEncoder, collate_rows
from finevit_vl.data.render import record_to_messages
from finevit_vl.data.synthetic import Settings, make_data
from finevit_vl.models import FineViTImageProcessor
from finevit_vl.models.modeling_finevit import get_vision_position_ids
from finevit_vl.prompts import BOX_TO_CAPTION, CAPTION_TO_BOX
from finevit_vl.train.region_distillation import pool_regions


def _prompts(messages) -> list[str]:
    return [part["text"] for m in messages if m["role"] == "user" for part in m["content"] if part["type"] == "text"]


def test_region_directions_select_the_turns():
    record = {"task": "region", "image": "a.png", "regions": [{"box": [0, 0, 10, 10], "text": "a red circle"},
                                                             {"box": [10, 10, 20, 20], "text": "a blue square"}]}
    grounding = {"task": "grounding", "image": "a.png", "grounding": [{"expression": "the red circle", "box": [0, 0, 5, 5]}]}
    both = _prompts(record_to_messages(record, 20, 20))
    to_text = _prompts(record_to_messages(record, 20, 20, directions="box_to_text"))
    to_box = _prompts(record_to_messages(record, 20, 20, directions="text_to_box"))
    caption_prefix, box_prefix = BOX_TO_CAPTION.split("{")[0], CAPTION_TO_BOX.split("{")[0]
    assert len(both) == 4 and len(to_text) == len(to_box) == 2
    assert all(p.startswith(caption_prefix) for p in to_text) and all(p.startswith(box_prefix) for p in to_box)
    assert _prompts(record_to_messages(grounding, 20, 20, directions="box_to_text"))[0].startswith(caption_prefix)
    with pytest.raises(ValueError, match="directions"):
        record_to_messages(record, 20, 20, directions="sideways")


def test_box_crops_of_images_of_different_sizes_in_one_packed_row(tmp_path, tokenizer):
    """Two records with images of different sizes packed into one row: each box keeps the index of its own image in
    the batch and that image's original size, so ROIAlign pools it on its own feature map."""
    from finevit_vl.tiny import build_tiny_model

    _, processor = build_tiny_model(tokenizer=tokenizer, max_pixels=112 * 112)
    crops = RegionCrops(FineViTImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56), max_regions=4)
    encoder = SampleEncoder(processor, max_length=2048, shuffle_turns=False, region_crops=crops)
    samples = []
    for name, size, boxes in (("a.png", (112, 56), [[0, 0, 56, 56], [56, 0, 112, 56]]), ("b.png", (84, 84), [[14, 28, 70, 84]])):
        random_image(size[1], size[0], 0).save(tmp_path / name)
        record = {"id": name, "task": "region", "image": name, "_image_root": str(tmp_path),
                  "regions": [{"box": box, "text": f"thing {i}"} for i, box in enumerate(boxes)]}
        samples.append(encoder.encode_record(record, f"x.jsonl:{name}"))
    batch = collate_rows([samples], processor.tokenizer.pad_token_id, encoder.dummy_image_inputs)
    assert batch["region_box_image"].tolist() == [0, 0, 1]
    assert batch["region_image_sizes"].tolist() == [[112, 56], [84, 84]]
    assert batch["region_crop_image_grid_thw"].shape == (3, 3)
    grid = batch["image_grid_thw"]
    positions = get_vision_position_ids(grid, 2).float()
    image = torch.cat([torch.full((int(g.prod()),), float(i)) for i, g in enumerate(grid)])
    features = torch.cat([positions, image[:, None]], 1)  # (col is channel 1, row channel 0, image channel 2)
    pooled = pool_regions(features, grid, 2, batch["region_boxes"], batch["region_box_image"],
                          [tuple(s) for s in batch["region_image_sizes"].tolist()], output_size=1)[:, :, 0, 0]
    assert pooled[:, 2].tolist() == [0.0, 0.0, 1.0]  # each box on its own image
    h0, w0 = grid[0, 1:].tolist()
    # Box 2 of image 0 is its right half: mean column (in patch units, centres at c + 0.5) = 3/4 of the width - 0.5.
    assert pooled[1, 1].item() == pytest.approx(0.75 * w0 - 0.5, abs=1e-4)
    assert pooled[0, 0].item() == pytest.approx(h0 / 2 - 0.5, abs=1e-4)


@pytest.fixture(scope="module")
def stage3_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("granvit_data")
    make_data(out, seed=0, train_per_task=12, eval_per_task=2, settings=Settings(image_size=112))
    return out


def _phase(config: str, data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [str(CONFIGS / config), f"run_dir={run_dir}", f"data.train.path={data / 'stage3' / 'train.jsonl'}",
            *overrides]


def test_ema_teacher_survives_a_stop_and_resume_bitwise(stage3_data, tmp_path):
    common = ("train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2", "data.num_workers=0")
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase1.yaml", stage3_data, tmp_path / "whole", *common)))
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase1.yaml", stage3_data, tmp_path / "stopped", *common,
                            "train.stop_after_steps=2")))
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase1.yaml", stage3_data, tmp_path / "stopped", *common)))
    teacher = {name: load_file(str(tmp_path / name / "checkpoints" / "checkpoint-00000004" / "ema_teacher.safetensors"))
               for name in ("whole", "stopped")}
    assert teacher["whole"].keys() == teacher["stopped"].keys()
    assert all(torch.equal(teacher["whole"][k], teacher["stopped"][k]) for k in teacher["whole"])
    whole, stopped = _step_losses(tmp_path / "whole"), _step_losses(tmp_path / "stopped")
    assert all(stopped[s] == pytest.approx(whole[s], rel=1e-5) for s in whole)
    logged = [m for m in _metrics(tmp_path / "whole") if "distill_loss" in m]
    assert len(logged) == 4 and all(m["distill_loss"] > 0 for m in logged)
    assert logged[-1]["distill_regions"] > logged[0]["distill_regions"] > 0  # cumulative boxes distilled
    # The teacher is an EMA of the student, not the student: it lags the exported encoder.
    student = {k.removeprefix("model.vision_tower."): v for k, v in
               load_file(str(tmp_path / "whole" / "final" / "model.safetensors")).items() if "vision_tower" in k}
    shared = [k for k in teacher["whole"] if k in student and student[k].is_floating_point()]
    assert shared and any(not torch.equal(teacher["whole"][k], student[k]) for k in shared)


def test_the_two_phase_configs_run_end_to_end(stage3_data, tmp_path):
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase1.yaml", stage3_data, tmp_path / "phase1", "train.max_steps=4")))
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase2.yaml", stage3_data, tmp_path / "phase2", "train.max_steps=4",
                            f"model.path={tmp_path / 'phase1' / 'final'}")))
    before = load_file(str(tmp_path / "phase1" / "final" / "model.safetensors"))
    after = load_file(str(tmp_path / "phase2" / "final" / "model.safetensors"))
    encoder = [k for k in before if "vision_tower" in k]
    llm = [k for k in before if "language_model" in k]
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # phase 2: encoder frozen
    assert any(not torch.equal(before[k], after[k]) for k in llm)  # ... the LLM trains
    init = load_file(str(tmp_path / "phase1" / "init" / "model.safetensors"))
    assert all(torch.equal(init[k], before[k]) for k in llm)  # phase 1: LLM frozen
    assert not any("distill_loss" in m for m in _metrics(tmp_path / "phase2"))


TWO_PHASES_IN_ONE_RUN = (
    "train.phases=[{start_step: 0, frozen_modules: [language_model], region_directions: box_to_text, distill_weight: 1.0},"
    " {start_step: 3, frozen_modules: [vision_tower], region_directions: text_to_box, distill_weight: 0.0}]"
)


def test_the_two_phases_inside_one_run(stage3_data, tmp_path):
    """`train.phases`: the LLM is frozen for the first 3 steps and the encoder after them; distillation is weighted
    out in the second phase; the learning rates logged say so."""
    run_dir = tmp_path / "two_phases"
    _run(_launch_cmd(_phase("tiny_cpu_stage3.yaml", stage3_data, run_dir, "train.max_steps=6", "train.log_every=1",
                            "train.checkpoint_every=3", "train.keep_last=2", "data.eval=null", "distill.enabled=true",
                            "distill.crop_pixels=3136", TWO_PHASES_IN_ONE_RUN)))
    init = load_file(str(run_dir / "init" / "model.safetensors"))
    middle = load_file(str(run_dir / "checkpoints" / "checkpoint-00000003" / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    encoder = [k for k in init if "vision_tower" in k and init[k].is_floating_point()]
    llm = [k for k in init if "language_model" in k]
    assert all(torch.equal(init[k], middle[k]) for k in llm)  # phase 1: LLM frozen
    assert any(not torch.equal(init[k], middle[k]) for k in encoder)
    assert all(torch.equal(middle[k], final[k]) for k in encoder)  # phase 2: encoder frozen
    assert any(not torch.equal(middle[k], final[k]) for k in llm)
    # Each record logs the rates the next step will use (the schedule has stepped).
    lrs = {m["step"]: m for m in _metrics(run_dir) if "lr/language_model/no_decay" in m}
    assert lrs[2]["lr/language_model/no_decay"] == 0.0 < lrs[2]["lr/vision_tower/no_decay"]
    assert lrs[5]["lr/vision_tower/no_decay"] == 0.0 < lrs[5]["lr/language_model/no_decay"]


def test_a_task_filter_keeps_only_the_named_tasks(stage3_data):
    from collections import Counter

    from finevit_vl.data.sources import build_source

    path = stage3_data / "stage3" / "train.jsonl"
    everything = Counter(record["task"] for record, _ in build_source({"type": "jsonl", "path": str(path)}))
    kept = build_source({"type": "jsonl", "path": str(path), "tasks": ["caption", "ocr"]})
    shards = [Counter(record["task"] for record, _ in kept.shard(rank, 2)) for rank in range(2)]
    assert set(everything) > {"caption", "ocr"}  # region and grounding records are there to drop
    assert shards[0] + shards[1] == Counter({task: everything[task] for task in ("caption", "ocr")})
    assert not hasattr(kept, "__len__")  # train.epochs needs a countable source


def test_a_record_without_turns_in_the_direction_is_passed_over_not_counted_bad(tmp_path, tokenizer):
    """Caption -> box only, and every caption of the record names several boxes: nothing to ask, not bad data."""
    from finevit_vl.data.collator import RecordOutsideDirection
    from finevit_vl.tiny import build_tiny_model
    from finevit_vl.train.data import BadRecordLog, TrainStream

    _, processor = build_tiny_model(tokenizer=tokenizer, max_pixels=112 * 112)
    random_image(56, 56, 0).save(tmp_path / "a.png")
    same = [{"box": [0, 0, 20, 20], "text": "a green triangle"}, {"box": [30, 30, 50, 50], "text": "a green triangle"}]
    records = [{"id": "ambiguous", "task": "region", "image": "a.png", "regions": same},
               {"id": "fine", "task": "region", "image": "a.png", "regions": same[:1]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    encoder = SampleEncoder(processor, max_length=2048, shuffle_turns=False, region_directions="text_to_box")
    record = {**records[0], "_image_root": str(tmp_path)}
    with pytest.raises(RecordOutsideDirection, match="no text_to_box turn"):
        encoder.encode_record(record, "train.jsonl:1")
    SampleEncoder(processor, max_length=2048, region_directions="box_to_text").encode_record(record, "train.jsonl:1")
    from finevit_vl.data.sources import JsonlSource

    log = BadRecordLog(None)
    stream = TrainStream(JsonlSource(tmp_path / "train.jsonl"), encoder, 2, 2, False,
                         processor.tokenizer.pad_token_id, log)
    step = stream.next_step()
    assert step.stop_reason is None and step.num_samples == 2  # the usable record, twice (two passes)
    assert log.count == 0 and log.records_skipped == 0


def test_self_distillation_on_two_processes_matches_one_process(stage3_data, tmp_path):
    """The distillation term is a mean over every box of the global batch, whichever rank holds the box; each rank's
    EMA teacher follows the same synchronised student."""
    common = ("train.max_steps=3", "train.log_every=1", "train.global_batch_size=4", "train.micro_batch_size=1")
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase1.yaml", stage3_data, tmp_path / "one", *common)))
    _run(_launch_cmd(_phase("tiny_cpu_granvit_phase1.yaml", stage3_data, tmp_path / "two", *common), processes=2))
    one, two = ({m["step"]: m for m in _metrics(tmp_path / name) if "distill_loss" in m} for name in ("one", "two"))
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step]["distill_loss"] == pytest.approx(one[step]["distill_loss"], abs=1e-5), step
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-5), step
        assert two[step]["distill_regions"] == one[step]["distill_regions"]
