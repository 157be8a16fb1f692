"""GranViT's region self-distillation, the self-contained core: the student's full-image patch features are
ROIAligned at each box, an EMA teacher encodes the box crop, and the two pooled maps are matched with MSE.

Conventions (GranViT states the ROIAlign + MSE + EMA 0.9 recipe, not these details; the toolkit chooses):
- Boxes are `[x1, y1, x2, y2]` in pixels of the ORIGINAL image. They are mapped to the patch grid per axis
  (`x * w / width`, `y * h / height`), because the processor's resize to multiples of 28 is not uniform.
- ROIAlign is `torchvision.ops.roi_align` with `aligned=True` (patch (r, c) is sampled at its centre, grid
  coordinate (r + 0.5, c + 0.5)) and `spatial_scale=1` on grid-unit boxes. `output_size` is the side of the square
  pooled map. `sampling_ratio=0` (the default) is adaptive, `ceil(bin side)` samples per bin side, so every patch
  under a bin contributes even when a large box is pooled to a small output.
- The teacher's crop is pooled by the same op over its whole extent, so a crop equal to the full image gives exactly
  the student's pooled full-image box.
- Pooling runs in fp32 (the ROIAlign kernels do not cover bf16 everywhere, and the loss is fp32 anyway).
"""

import copy
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


def patch_feature_maps(features: Tensor, grid_thw: Tensor, merge_size: int) -> list[Tensor]:
    """(total_patches, D) packed features -> one (D, h, w) spatial map per image (the merge-group order undone).

    Patches of an image are merge-group-major (see `get_vision_position_ids`); images must be stills (t = 1).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be packed as (total_patches, D), got shape {tuple(features.shape)}")
    grids = grid_thw.tolist()
    if any(t != 1 for t, _, _ in grids):
        raise ValueError(f"region pooling takes still images (t = 1), got grid_thw {grids}")
    sizes = [h * w for _, h, w in grids]
    if sum(sizes) != features.shape[0]:
        raise ValueError(f"grid_thw describes {sum(sizes)} patches but features has {features.shape[0]}")
    maps = []
    for chunk, (_, h, w) in zip(features.split(sizes), grids, strict=True):
        m = merge_size
        # (h/m * w/m * m * m, D) -> (h/m, w/m, m, m, D) -> (h/m, m, w/m, m, D) -> (D, h, w)
        grid = chunk.reshape(h // m, w // m, m, m, -1).permute(0, 2, 1, 3, 4).reshape(h, w, -1)
        maps.append(grid.permute(2, 0, 1))
    return maps


def boxes_to_grid(boxes: Tensor, image_size: tuple[int, int], grid_hw: tuple[int, int]) -> Tensor:
    """(R, 4) pixel boxes of an image of (width, height) -> boxes in patch-grid units of its (h, w) patch grid
    (x scaled by w / width, y by h / height: the processor's resize is not exactly uniform after rounding)."""
    width, height = image_size
    h, w = grid_hw
    boxes = boxes.to(torch.float32) if not boxes.is_floating_point() else boxes
    # Multiply before dividing: integer pixel boxes on grid-aligned edges map to exact grid values.
    scale = boxes.new_tensor([w, h, w, h])
    return boxes * scale / boxes.new_tensor([width, height, width, height])


def _pool_maps(
    maps: list[Tensor], grid_boxes: Tensor, box_image: Tensor, output_size: int, sampling_ratio: int
) -> Tensor:
    """ROIAlign `grid_boxes[r]` on `maps[box_image[r]]` (CPU boxes and indices); maps of equal size are stacked into
    one call, never padded together (padding would leak into border samples)."""
    if output_size < 1:
        raise ValueError(f"output_size must be at least 1, got {output_size}")
    device = maps[0].device
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in sorted(set(box_image.tolist())):
        groups[tuple(maps[index].shape[1:])].append(index)
    order, pooled = [], []
    for indices in groups.values():
        batch = torch.stack([maps[index] for index in indices]).float()  # (n, D, h, w)
        rows = [(box_image == index).nonzero().squeeze(1) for index in indices]
        slots = torch.cat([torch.full_like(r, slot) for slot, r in enumerate(rows)])
        rows = torch.cat(rows)
        rois = torch.cat([slots[:, None].float(), grid_boxes[rows]], dim=1)  # (k, 5): slot in batch, x1, y1, x2, y2
        pooled.append(
            roi_align(batch, rois.to(device), output_size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)
        )
        order.append(rows)
    if not pooled:
        return maps[0].new_zeros(0, maps[0].shape[0], output_size, output_size, dtype=torch.float32)
    # Grouped order -> the order of the boxes.
    return torch.cat(pooled)[torch.cat(order).argsort().to(device)]


def pool_regions(
    features: Tensor,
    grid_thw: Tensor,
    merge_size: int,
    boxes: Tensor,
    box_image: Tensor,
    image_sizes: list[tuple[int, int]],
    output_size: int,
    sampling_ratio: int = 0,
) -> Tensor:
    """Student side: ROIAlign each box on the feature map of the image it belongs to.

    Args:
        features (`Tensor` of shape `(total_patches, D)`): packed encoder features (`last_hidden_state`).
        grid_thw (`Tensor` of shape `(num_images, 3)`): patch grid of each image in the pack.
        merge_size (`int`): the encoder's `spatial_merge_size`.
        boxes (`Tensor` of shape `(R, 4)`): `[x1, y1, x2, y2]` in pixels of the ORIGINAL image.
        box_image (`Tensor` of shape `(R,)`): index in the pack of the image each box belongs to.
        image_sizes (`list[tuple[int, int]]`): ORIGINAL `(width, height)` of each image.
        output_size (`int`): side of the square pooled map.
        sampling_ratio (`int`, *optional*, defaults to 0): samples per bin side; 0 is adaptive (`ceil(bin side)`).

    Returns:
        `Tensor` of shape `(R, D, output_size, output_size)`, fp32, in the order of `boxes`.
    """
    maps = patch_feature_maps(features, grid_thw, merge_size)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (R, 4), got {tuple(boxes.shape)}")
    if box_image.shape != (boxes.shape[0],):
        raise ValueError(f"box_image must have shape ({boxes.shape[0]},), got {tuple(box_image.shape)}")
    if len(image_sizes) != len(maps):
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for a pack of {len(maps)} images")
    if boxes.shape[0] and not 0 <= int(box_image.min()) <= int(box_image.max()) < len(maps):
        raise ValueError(f"box_image must index the {len(maps)} images of the pack, got {box_image.tolist()}")
    boxes, box_image = boxes.detach().to("cpu", torch.float32), box_image.cpu()  # small; no gradient through boxes
    grid_boxes = boxes.clone()
    for index in sorted(set(box_image.tolist())):
        mine = box_image == index
        grid_boxes[mine] = boxes_to_grid(boxes[mine], image_sizes[index], tuple(maps[index].shape[1:]))
    return _pool_maps(maps, grid_boxes, box_image, output_size, sampling_ratio)


def pool_whole_image(
    features: Tensor, grid_thw: Tensor, merge_size: int, output_size: int, sampling_ratio: int = 0
) -> Tensor:
    """Teacher side: each image's map pooled the same way over its full extent (a box [0, 0, w, h] in grid units)
    -> (num_images, D, output_size, output_size), fp32. Same op as `pool_regions`, so a crop equal to the full image
    gives exactly the student's pooled full-image box."""
    maps = patch_feature_maps(features, grid_thw, merge_size)
    grid_boxes = torch.tensor([[0.0, 0.0, m.shape[2], m.shape[1]] for m in maps])
    return _pool_maps(maps, grid_boxes, torch.arange(len(maps)), output_size, sampling_ratio)


def distillation_loss(student_regions: Tensor, teacher_regions: Tensor) -> Tensor:
    """Mean squared error over all elements, the teacher side detached; fp32. No regions give 0 (still a graph node,
    so `backward()` works on a batch without boxes)."""
    if student_regions.shape != teacher_regions.shape:
        raise ValueError(
            f"student and teacher regions differ in shape: {tuple(student_regions.shape)} vs "
            f"{tuple(teacher_regions.shape)}"
        )
    student = student_regions.float()
    if student.numel() == 0:
        return student.sum()
    return F.mse_loss(student, teacher_regions.detach().float())


class EMATeacher(nn.Module):
    """A frozen copy of the student encoder updated as theta_t <- momentum * theta_t + (1 - momentum) * theta_s
    (GranViT: momentum 0.9).

    No parameter requires grad, and the copy always stays in eval mode. Hold it beside the student, not inside it, so
    the student's optimizer, freeze logic and checkpoints never see it. Buffers are copied from the student at each
    update. `state_dict()` is the copy's own (the student's keys, plain tensors, safetensors-ready); `momentum` is
    configuration, passed again to the constructor on resume, and never part of the state.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.9) -> None:
        super().__init__()
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(student)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        self.module.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.module.eval()  # the teacher never trains: no dropout, no running-stat updates
        return self

    @staticmethod
    def _matched(kind: str, teacher: dict[str, Tensor], student: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        if teacher.keys() != student.keys():
            missing, unexpected = sorted(teacher.keys() - student.keys()), sorted(student.keys() - teacher.keys())
            raise ValueError(
                f"the student's {kind} do not match the teacher's: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; pass the bare encoder (unwrapped from DDP/FSDP/torch.compile) it was copied from"
            )
        shapes = [name for name in teacher if teacher[name].shape != student[name].shape]
        if shapes:
            raise ValueError(f"the student's {kind} differ in shape from the teacher's: {shapes[:5]}")
        return [(teacher[name], student[name].detach()) for name in teacher]

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, parameters matched by name; buffers copied."""
        pairs = self._matched("parameters", dict(self.module.named_parameters()), dict(student.named_parameters()))
        if pairs:
            teachers = [t for t, _ in pairs]
            # Under FSDP2 the student's parameters are shards (DTensors): the teacher, a plain copy, takes them whole.
            students = [(s.full_tensor() if hasattr(s, "full_tensor") else s).to(device=t.device, dtype=t.dtype)
                        for t, s in pairs]
            # t + (1 - m)(s - t): exact (no drift) when the student equals the teacher.
            torch._foreach_lerp_(teachers, students, 1.0 - self.momentum)
        for t, s in self._matched("buffers", dict(self.module.named_buffers()), dict(student.named_buffers())):
            t.copy_(s)

    def forward(self, *args, **kwargs):
        """The teacher copy's forward under `torch.no_grad()`, in eval mode."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self.module.load_state_dict(state_dict, strict=strict, assign=assign)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        return result


class RegionDistillation:
    """The loss term and the teacher of one run (`distill.*` of the config), beside the trainer's next-token loss.

    The student's features are the ones the projector takes (`vision_feature_layer`, from the VL forward's
    `image_patch_features`); the teacher encodes each micro-batch's box crops with the same layer selection
    (`encode_images`). `loss_sum` returns the sum over the micro-batch's boxes of each box's MSE, so that the trainer
    can divide by the boxes of the whole global batch, as it does tokens.
    """

    def __init__(self, vision_tower: nn.Module, config, feature_layer: int | list[int], merge_size: int,
                 device) -> None:
        if vision_tower.config.model_type != "finevit":
            raise ValueError(f"distill.enabled needs a FineViT encoder (packed patch features); this model's is "
                             f"{vision_tower.config.model_type}")
        self.teacher = EMATeacher(vision_tower, config.momentum).to(device)
        self.config = config
        self.layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.merge_size = merge_size
        self.device = device

    def loss_sum(self, patch_features: Tensor | None, micro: dict) -> tuple[Tensor, int]:
        """`(sum of per-box MSE, number of boxes)` for one micro-batch (zero without boxes)."""
        if "region_boxes" not in micro or patch_features is None:
            return torch.zeros((), device=self.device), 0
        from ..models.vision_adapters import encode_images

        grid = micro["image_grid_thw"]
        image_sizes = [tuple(size) for size in micro["region_image_sizes"].tolist()]
        student = pool_regions(patch_features, grid, self.merge_size, micro["region_boxes"], micro["region_box_image"],
                               image_sizes, self.config.output_size)
        with torch.no_grad():
            crops = {"pixel_values": micro["region_crop_pixel_values"].to(self.device, next(self.teacher.parameters()).dtype),
                     "image_grid_thw": micro["region_crop_image_grid_thw"].to(self.device)}
            features, crop_grid = encode_images(self.teacher.module, crops, self.layers, self.merge_size)
            teacher = pool_whole_image(features, crop_grid, self.merge_size, self.config.output_size)
        per_box = (student - teacher.detach()).pow(2).flatten(1).mean(1)
        return per_box.sum(), int(per_box.shape[0])

    def update(self, vision_tower: nn.Module) -> None:
        self.teacher.update(vision_tower)


__all__ = [
    "EMATeacher",
    "RegionDistillation",
    "boxes_to_grid",
    "distillation_loss",
    "patch_feature_maps",
    "pool_regions",
    "pool_whole_image",
]
