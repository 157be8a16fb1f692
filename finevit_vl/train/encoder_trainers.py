"""The training steps of the encoder's pretraining stages, on the shared loop of `finevit_vl.train.trainer.Trainer`
(checkpoints, exact resume, phases, logging, export).

Stage I (`MaskedImageTrainer`). Every optimizer step minimises the mean loss over all masked patches of its global
batch: each micro-batch contributes `sum of patch losses * world_size / global_masked_patches`, like the next-token
loss over tokens. With the feature target, a frozen teacher (no gradient, not wrapped by DDP / FSDP, not saved in
checkpoints: it is loaded again from its folder) encodes each whole image; its patch tokens (after dropping CLS and
register tokens) are resampled bilinearly onto the student's patch grid when the patch sizes differ and put in the
student's patch order.

Stage II (`ContrastiveTrainer`). The loss of a step is the contrastive loss over the whole global batch, with
negatives from every process (`finevit_vl.train.contrastive_loss`), so it does not depend on the number of processes.
With several micro-batches per step it stays exact by gradient caching (open_clip's `--accum-freq`, GradCache): the
embeddings of all micro-batches are computed without gradients, the loss and its gradient with respect to the
embeddings (and the temperature and bias) are computed on the full set, then each micro-batch runs again with
gradients and backpropagates those embedding gradients. This costs one extra forward per micro-batch.
"""

import inspect

import torch
from torch.nn import functional as F

from ..models.modeling_finevit import get_vision_position_ids
from .contrastive_loss import CONTRASTIVE_LOSSES
from .data import StepBatch
from .trainer import Trainer


ENCODER_INPUTS = ("pixel_values", "image_grid_thw")


class _EncoderStageTrainer(Trainer):
    def make_filler(self, processor) -> None:
        # Every rank takes the same number of samples per step in micro-batches of one size, so every rank runs the
        # same number of forwards: no filler is ever needed.
        return None

    def encoder_inputs(self, micro: dict) -> dict:
        device = self.accelerator.device
        return {"pixel_values": micro["pixel_values"].to(device, self.vision_dtype),
                "image_grid_thw": micro["image_grid_thw"].to(device)}


class MaskedImageTrainer(_EncoderStageTrainer):
    """Stage I: regress the hidden patches onto the teacher's features (`teacher` given) or onto their pixels."""

    def __init__(self, *args, teacher=None, teacher_layer: int = -1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.teacher_layer = teacher_layer
        # SigLIP / CLIP towers interpolate their position table only when asked; DINOv2 always does.
        self.teacher_kwargs = {"output_hidden_states": teacher_layer != -1}
        if teacher is not None and "interpolate_pos_encoding" in inspect.signature(teacher.forward).parameters:
            self.teacher_kwargs["interpolate_pos_encoding"] = True

    @torch.no_grad()
    def teacher_features(self, micro: dict) -> torch.Tensor:
        """`(total_patches, teacher_width)`: the teacher's patch features on the student's grid, in its order."""
        device = self.accelerator.device
        grids = micro["image_grid_thw"]
        features = []
        dtype = next(self.teacher.parameters()).dtype
        merge = self.processor.merge_size
        for pixels, grid in zip(micro["teacher_pixel_values"], grids):
            outputs = self.teacher(pixel_values=pixels[None].to(device, dtype), **self.teacher_kwargs)
            tokens = outputs.last_hidden_state if self.teacher_layer == -1 else outputs.hidden_states[self.teacher_layer]
            patch = self.teacher.config.patch_size
            rows, cols = pixels.shape[1] // patch, pixels.shape[2] // patch
            # Prefix tokens (CLS, registers) come first in every transformers ViT.
            maps = tokens[0, -rows * cols :].float().T.reshape(1, -1, rows, cols)
            _, height, width = grid.tolist()
            if (rows, cols) != (height, width):
                maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
            positions = get_vision_position_ids(grid[None], merge)
            features.append(maps[0][:, positions[:, 0], positions[:, 1]].T)
        return torch.cat(features)

    def accumulate(self, batch: StepBatch, num_micro: int, targets: float) -> torch.Tensor:
        accelerator = self.accelerator
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for _, micro, _ in self.micro_batches(batch, num_micro):
            target = self.teacher_features(micro) if self.teacher is not None else None
            outputs = self.model(**self.encoder_inputs(micro), visible_mask=micro["visible_mask"].to(accelerator.device),
                                 target_features=target)
            micro_sum = outputs.patch_losses.sum()
            accelerator.backward(micro_sum * (accelerator.num_processes / targets))
            loss_sum += micro_sum.detach().double()
        return loss_sum


class ContrastiveTrainer(_EncoderStageTrainer):
    """Stage II: the sigmoid (SigLIP) or softmax (CLIP) loss over the global batch."""

    def __init__(self, *args, loss: str = "sigmoid", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = CONTRASTIVE_LOSSES[loss]
        self.loss_type = loss

    def _forward(self, micro: dict):
        device = self.accelerator.device
        return self.model(**self.encoder_inputs(micro), input_ids=micro["input_ids"].to(device),
                          attention_mask=micro["attention_mask"].to(device))

    def _share(self, image_embeds, text_embeds, logit_scale, logit_bias) -> torch.Tensor:
        if self.loss_type == "sigmoid":
            return self.loss_fn(image_embeds, text_embeds, logit_scale, logit_bias)
        return self.loss_fn(image_embeds, text_embeds, logit_scale)

    def accumulate(self, batch: StepBatch, num_micro: int, targets: float) -> torch.Tensor:
        accelerator = self.accelerator
        world = accelerator.num_processes
        if num_micro == 1:
            for _, micro, _ in self.micro_batches(batch, num_micro):
                outputs = self._forward(micro)
                share = self._share(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias)
                accelerator.backward(share * world)
            return share.detach().double() * targets  # the trainer divides the sum over ranks by the global pairs
        # Gradient caching: embeddings first, without gradients ...
        cached = []
        with torch.no_grad():
            for micro in batch.micro_batches:
                outputs = self._forward(micro)
                cached.append((outputs.image_embeds, outputs.text_embeds))
        image = torch.cat([c[0] for c in cached]).detach().requires_grad_()
        text = torch.cat([c[1] for c in cached]).detach().requires_grad_()
        scale = outputs.logit_scale.detach().clone().requires_grad_()
        bias = outputs.logit_bias.detach().clone().requires_grad_()
        share = self._share(image, text, scale, bias)
        share.backward()  # the loss's gradient w.r.t. every local embedding (all ranks' shares, via the gather)
        # ... then each micro-batch again, backpropagating its slice of those gradients.
        start = 0
        for _, micro, _ in self.micro_batches(batch, num_micro):
            outputs = self._forward(micro)
            stop = start + outputs.image_embeds.shape[0]
            surrogate = ((outputs.image_embeds * image.grad[start:stop]).sum()
                         + (outputs.text_embeds * text.grad[start:stop]).sum()
                         + (outputs.logit_scale * scale.grad
                            + outputs.logit_bias * (bias.grad if bias.grad is not None else 0.0)) / num_micro)
            accelerator.backward(surrogate * world)
            start = stop
        return share.detach().double() * targets


__all__ = ["ContrastiveTrainer", "MaskedImageTrainer"]
