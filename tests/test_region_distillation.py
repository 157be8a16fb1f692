"""GranViT region self-distillation: ROIAlign against hand-computed sample coordinates on a mixed-size pack, the
merge-group round trip, per-axis box scaling, loss 0 for an identical EMA teacher on the full-image crop, gradients
reaching only the student, and the EMA update, state round trip and validation."""

import math

import pytest
import torch
from conftest import random_image
from safetensors.torch import load_file, save_file
from torch import nn

from finevit_vl import FineViTConfig, FineViTImageProcessor, FineViTModel
from finevit_vl.data.collator import crop_regions
from finevit_vl.models.modeling_finevit import get_vision_position_ids
from finevit_vl.train.region_distillation import (
    EMATeacher,
    boxes_to_grid,
    distillation_loss,
    patch_feature_maps,
    pool_regions,
    pool_whole_image,
)


MERGE = 2
# Two images of different sizes in one pack: original (width, height) and the (h, w) patch grid each was resized to.
# Image 0: 120x80 -> 4x6 grid (x and y scale 0.05); image 1: 200x100 -> 6x10 grid (x scale 0.05, y scale 0.06).
IMAGE_SIZES = [(120, 80), (200, 100)]
GRID_THW = torch.tensor([[1, 4, 6], [1, 6, 10]])


def _coordinate_features(grid_thw: torch.Tensor) -> torch.Tensor:
    """Packed (total_patches, 3) features, merge-group-major: channel 0 = col, 1 = row, 2 = image index."""
    positions = get_vision_position_ids(grid_thw, MERGE)
    image = torch.arange(len(grid_thw)).repeat_interleave(grid_thw.prod(-1))
    return torch.stack([positions[:, 1], positions[:, 0], image], dim=-1).float()


def _encoder(seed: int = 0) -> FineViTModel:
    torch.manual_seed(seed)
    return FineViTModel(FineViTConfig.from_preset("finevit-test"))


# For a linear map, ROIAlign (aligned=True) returns the mean sample coordinate of each bin, its centre:
# x1 * scale - 0.5 + (j + 0.5) * (x2 - x1) * scale / out, as long as no sample falls outside [0, size - 1].
# Each case: (image, pixel box, expected col per output column, expected row per output row), output 2x2.
REGION_CASES = [
    # Image 1: grid box [2.5, 1.5, 6.5, 4.5] -> aligned [2, 1, 6, 4]; bins 2 wide, 1.5 high.
    (1, [50.0, 25.0, 130.0, 75.0], [3.0, 5.0], [1.75, 3.25]),
    # Image 0: grid box [1, 1, 5, 3] -> aligned [0.5, 0.5, 4.5, 2.5]; bins 2 wide, 1 high.
    (0, [20.0, 20.0, 100.0, 60.0], [1.5, 3.5], [1.0, 2.0]),
    # Image 0, the full image: grid box [0, 0, 6, 4] -> aligned [-0.5, -0.5, 5.5, 3.5]; bins 3 wide, 2 high.
    (0, [0.0, 0.0, 120.0, 80.0], [1.0, 4.0], [0.5, 2.5]),
    # Image 1, the full image: grid box [0, 0, 10, 6] -> aligned [-0.5, -0.5, 9.5, 5.5]; bins 5 wide, 3 high.
    (1, [0.0, 0.0, 200.0, 100.0], [2.0, 7.0], [1.0, 4.0]),
]


def _expected(image: int, cols: list[float], rows: list[float]) -> torch.Tensor:
    """(3, 2, 2): channel 0 varies along output columns, channel 1 along output rows, channel 2 is the image."""
    col = torch.tensor(cols).expand(2, 2)
    row = torch.tensor(rows)[:, None].expand(2, 2)
    return torch.stack([col, row, torch.full((2, 2), float(image))])


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_hand_computed_bins_on_a_mixed_size_pack(sampling_ratio):
    features = _coordinate_features(GRID_THW)
    boxes = torch.tensor([box for _, box, _, _ in REGION_CASES])
    box_image = torch.tensor([image for image, _, _, _ in REGION_CASES])
    pooled = pool_regions(features, GRID_THW, MERGE, boxes, box_image, IMAGE_SIZES, 2, sampling_ratio=sampling_ratio)
    assert pooled.shape == (len(REGION_CASES), 3, 2, 2) and pooled.dtype == torch.float32
    for r, (image, _, cols, rows) in enumerate(REGION_CASES):
        torch.testing.assert_close(pooled[r], _expected(image, cols, rows), atol=1e-5, rtol=0)
    # The teacher side pools each map over its full extent: exactly the student's full-image boxes.
    whole = pool_whole_image(features, GRID_THW, MERGE, 2, sampling_ratio=sampling_ratio)
    assert whole.shape == (2, 3, 2, 2)
    assert torch.equal(whole[0], pooled[2]) and torch.equal(whole[1], pooled[3])
    # A third image the size of image 0, after image 1: equal-size maps are batched, the box still finds its image.
    grid_thw = torch.cat([GRID_THW, GRID_THW[:1]])
    pooled3 = pool_regions(
        _coordinate_features(grid_thw), grid_thw, MERGE, boxes[[1, 0]], torch.tensor([2, 1]),
        [*IMAGE_SIZES, IMAGE_SIZES[0]], 2, sampling_ratio=sampling_ratio,
    )
    torch.testing.assert_close(pooled3[0], _expected(2, REGION_CASES[1][2], REGION_CASES[1][3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled3[1], _expected(1, REGION_CASES[0][2], REGION_CASES[0][3]), atol=1e-5, rtol=0)


def test_roi_align_border_samples_clamp_to_the_edge_patch():
    # Image 0, box [0, 0, 20, 20] px -> grid [0, 0, 1, 1] -> aligned [-0.5, -0.5, 0.5, 0.5], one bin, 2x2 samples at
    # -0.25 and 0.25: the one outside clamps to the edge patch (0), so the mean is (0 + 0.25) / 2 = 0.125 per axis.
    pooled = pool_regions(
        _coordinate_features(GRID_THW), GRID_THW, MERGE, torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([0]),
        IMAGE_SIZES, 1, sampling_ratio=2,
    )
    torch.testing.assert_close(pooled[0, :, 0, 0], torch.tensor([0.125, 0.125, 0.0]), atol=1e-6, rtol=0)


def test_patch_feature_maps_undoes_the_merge_group_order():
    grid_thw = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
    features = torch.randn(int(grid_thw.prod(-1).sum()), 5)
    maps = patch_feature_maps(features, grid_thw, MERGE)
    assert [tuple(m.shape) for m in maps] == [(5, 4, 6), (5, 2, 2), (5, 6, 4)]
    positions = get_vision_position_ids(grid_thw, MERGE)
    repacked = torch.cat(
        [m[:, p[:, 0], p[:, 1]].T for m, p in zip(maps, positions.split(grid_thw.prod(-1).tolist()), strict=True)]
    )
    assert torch.equal(repacked, features)
    # And the coordinate features land where they belong: map[:, r, c] = (c, r, image).
    for image, m in enumerate(patch_feature_maps(_coordinate_features(grid_thw), grid_thw, MERGE)):
        h, w = m.shape[1:]
        assert torch.equal(m[0], torch.arange(w).float().expand(h, w))
        assert torch.equal(m[1], torch.arange(h).float()[:, None].expand(h, w))
        assert bool((m[2] == image).all())


def test_boxes_to_grid_scales_each_axis_by_its_own_resize():
    processor = FineViTImageProcessor()
    grid = processor([random_image(200, 300)], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == [1, 14, 22]  # 300x200 -> 308x196: x scale 22/300, y scale 14/200 (a uniform scale would be wrong)
    boxes = torch.tensor([[30, 50, 150, 100], [0, 0, 300, 200]])  # integer boxes are accepted too
    grid_boxes = boxes_to_grid(boxes, (300, 200), (14, 22))
    assert grid_boxes.dtype == torch.float32
    torch.testing.assert_close(grid_boxes, torch.tensor([[2.2, 3.5, 11.0, 7.0], [0.0, 0.0, 22.0, 14.0]]))
    assert torch.equal(grid_boxes[1], torch.tensor([0.0, 0.0, 22.0, 14.0]))  # the full image maps exactly


def test_crop_regions_clamps_and_keeps_at_least_one_pixel():
    image = random_image(80, 100)
    crops = crop_regions(image, [[0, 0, 100, 80], [10.4, 20.6, 30.2, 40.0], [-5, -5, 200, 200], [120, 90, 130, 95]])
    assert [c.size for c in crops] == [(100, 80), (21, 20), (100, 80), (1, 1)]
    assert crops[0].tobytes() == image.tobytes()
    assert crops[1].tobytes() == image.crop((10, 20, 31, 40)).tobytes()
    with pytest.raises(ValueError, match="x2 < x1"):
        crop_regions(image, [[50, 0, 40, 10]])


def _student_and_teacher_regions(student: FineViTModel, teacher: EMATeacher, output_size: int = 3):
    processor = FineViTImageProcessor(min_pixels=112 * 112, max_pixels=112 * 112)
    image = random_image(90, 120, seed=1)
    width, height = image.size
    inputs = processor([image], return_tensors="pt")
    features = student(inputs["pixel_values"], inputs["image_grid_thw"], return_pooled=False).last_hidden_state
    student_regions = pool_regions(
        features, inputs["image_grid_thw"], MERGE, torch.tensor([[0.0, 0.0, width, height]]), torch.tensor([0]),
        [(width, height)], output_size,
    )
    crops = processor(crop_regions(image, [[0, 0, width, height]]), return_tensors="pt")
    assert torch.equal(crops["image_grid_thw"], inputs["image_grid_thw"])
    teacher_out = teacher(crops["pixel_values"], crops["image_grid_thw"], return_pooled=False)
    teacher_regions = pool_whole_image(teacher_out.last_hidden_state, crops["image_grid_thw"], MERGE, output_size)
    return student_regions, teacher_regions


def test_loss_is_zero_for_an_identical_teacher_on_the_full_image_crop():
    student = _encoder().eval()
    teacher = EMATeacher(student, momentum=0.9)
    teacher.update(student)  # the momentum update from an identical student leaves it identical
    assert all(torch.equal(t, s) for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True))
    student_regions, teacher_regions = _student_and_teacher_regions(student, teacher)
    assert student_regions.shape == (1, 32, 3, 3)
    loss = distillation_loss(student_regions, teacher_regions)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert student_regions.abs().sum() > 0  # not trivially zero features


def test_gradients_reach_only_the_student():
    student = _encoder().train()
    teacher = EMATeacher(student, momentum=0.9)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    student_regions, teacher_regions = _student_and_teacher_regions(student, teacher)
    assert not teacher_regions.requires_grad
    loss = distillation_loss(student_regions, teacher_regions)
    assert loss.item() > 0
    loss.backward()
    # Every student parameter on the patch-feature path (all but the unused pooling head) gets a non-zero gradient.
    for name, parameter in student.named_parameters():
        if name.startswith("head."):
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # The teacher is held beside the student, not inside it.
    assert not any(p is t for p in student.parameters() for t in teacher.parameters())


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_ema_update_follows_the_formula(momentum):
    torch.manual_seed(0)
    student = _Small()
    teacher = EMATeacher(student, momentum=momentum)
    expected = {name: p.detach().clone() for name, p in student.named_parameters()}
    for _ in range(2):
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(torch.randn_like(parameter))
        student(torch.randn(8, 3))  # train mode: running statistics (buffers) move
        teacher.update(student)
        for name, parameter in student.named_parameters():
            expected[name] = momentum * expected[name] + (1 - momentum) * parameter.detach()
    for name, parameter in teacher.module.named_parameters():
        torch.testing.assert_close(parameter, expected[name], atol=1e-6, rtol=0)
        assert not torch.allclose(parameter, dict(student.named_parameters())[name])  # a true average, not a copy
    for name, buffer in teacher.module.named_buffers():
        assert torch.equal(buffer, dict(student.named_buffers())[name]), name
    teacher.train()
    assert not teacher.module.training  # the copy stays in eval mode


def test_ema_state_round_trips_through_safetensors_and_validates(tmp_path):
    torch.manual_seed(0)
    student = _Small()
    teacher = EMATeacher(student, momentum=0.9)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(3.0)
    student(torch.randn(8, 3))
    teacher.update(student)
    state = teacher.state_dict()
    assert all(type(v) is torch.Tensor and not v.requires_grad for v in state.values())
    assert "momentum" not in state
    save_file(state, tmp_path / "teacher.safetensors")

    torch.manual_seed(1)
    restored = EMATeacher(_Small(), momentum=0.5)
    restored.load_state_dict(load_file(tmp_path / "teacher.safetensors"))
    assert restored.momentum == 0.5  # configuration, not state
    assert state.keys() == restored.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in restored.state_dict().items())
    assert all(not p.requires_grad for p in restored.parameters())

    for momentum in (-0.1, 1.0, 1.5, math.nan, True):
        with pytest.raises(ValueError, match="momentum"):
            EMATeacher(student, momentum=momentum)
    with pytest.raises(ValueError, match="do not match"):
        teacher.update(nn.Sequential(_Small()))
