"""Image-text contrastive losses of Stage II, exact across processes: SigLIP's sigmoid loss (the default of FineViT's
recipe, with a learnable temperature and bias) and CLIP's softmax loss.

The learnable `logit_scale` (log temperature) and `logit_bias` live in the model; the losses take them as tensors.

Distribution. Local row i of rank r is the global pair r * B_local + i. Each rank gathers the features it needs from
all ranks (`gather_with_grad`, (B_global, D) per rank) and computes only its own rows of the logits,
(B_local, B_global), so memory grows linearly with the world size, never with its square (a naive implementation
computes the full (B_global, B_global) matrix on every rank). open_clip's neighbour-exchange ring would avoid even the
gathered features; we chose the gather for simplicity and exactness.

Each loss returns this rank's share of the global loss: the shares sum over ranks to exactly the loss of one process
on the global batch.

Gradient convention. The caller multiplies the returned share by `world_size` before `backward()`, because DDP/FSDP
average gradients over ranks. The all_gather backward sums the gradients of every rank's share into each rank's own
slice, so rank r's gradient is `world_size` times rank r's contribution to the gradient of the global loss; the
average over ranks is then exactly the gradient of the global loss, for the shared weights and for `logit_scale` /
`logit_bias` alike.

Everything is computed in fp32 at least (float64 inputs stay float64, which `torch.autograd.gradcheck` needs).
"""

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


# The shape check gathers a fixed-length vector (ndim, *shape, padding) so that ranks with different ndims still meet.
_MAX_DIMS = 8
# CLIP clamps the learnable temperature so that exp(logit_scale) <= 100.
_MAX_LOGIT_SCALE = math.log(100.0)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' `features` concatenated in rank order along dim 0, with gradients flowing back to each rank's own
    slice (`torch.distributed.nn.functional.all_gather`); `features` itself when torch.distributed is not initialised
    or the world size is 1.

    Raises:
        ValueError: the ranks passed features of different shapes (checked with a cheap all_gather of the shape).
    """
    if not _is_distributed():
        return features
    if features.dim() > _MAX_DIMS:
        raise ValueError(f"gather_with_grad supports at most {_MAX_DIMS} dims, got shape {tuple(features.shape)}.")
    shape = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.long, device=features.device)
    shape[0] = features.dim()
    shape[1 : features.dim() + 1] = torch.tensor(features.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(other, shape) for other in shapes):
        sizes = [tuple(other[1 : int(other[0]) + 1].tolist()) for other in shapes]
        raise ValueError(
            f"gather_with_grad needs the same feature shape on every rank, got {sizes} (by rank); give every rank the "
            "same per-device batch size (drop_last=True in the loader)."
        )
    return torch.cat(dist_nn.all_gather(features), dim=0)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16/fp16 features are upcast, float64 ones (gradcheck) stay float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def sigmoid_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP loss, this rank's share.

    Args:
        image_embeds (`torch.Tensor` of shape `(B_local, D)`): L2-normalised; row i pairs with row i of `text_embeds`.
        text_embeds (`torch.Tensor` of shape `(B_local, D)`): L2-normalised.
        logit_scale (`torch.Tensor`, scalar): log temperature; logits are multiplied by its exp.
        logit_bias (`torch.Tensor`, scalar): added to every logit.

    With logits = image @ all_texts.T * exp(logit_scale) + logit_bias and labels +1 on the pairs, -1 elsewhere, the
    global loss is -(1 / B_global) * sum_{i, j over the global batch} logsigmoid(label_ij * logit_ij) (the SigLIP
    paper's mean over images of the sum over texts). Returns the sum over this rank's image rows against the texts of
    all ranks, divided by B_global: the shares sum over ranks to the global loss.
    """
    dtype = _compute_dtype(image_embeds, text_embeds)
    images = image_embeds.to(dtype)
    all_texts = gather_with_grad(text_embeds.to(dtype))
    batch_local, batch_global = images.shape[0], all_texts.shape[0]
    # (B_local, D) @ (D, B_global) -> (B_local, B_global): only this rank's rows of the global matrix.
    logits = images @ all_texts.T * logit_scale.to(dtype).exp() + logit_bias.to(dtype)
    labels = -torch.ones_like(logits)
    rows = torch.arange(batch_local, device=logits.device)
    labels[rows, _rank() * batch_local + rows] = 1.0
    return -F.logsigmoid(labels * logits).sum() / batch_global


def softmax_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP loss, this rank's share.

    Args:
        image_embeds (`torch.Tensor` of shape `(B_local, D)`): L2-normalised; row i pairs with row i of `text_embeds`.
        text_embeds (`torch.Tensor` of shape `(B_local, D)`): L2-normalised.
        logit_scale (`torch.Tensor`, scalar): log temperature, clamped so that exp(logit_scale) <= 100 like CLIP.

    With logits = exp(logit_scale) * image @ text.T, the global loss is 0.5 * (mean over images of the cross-entropy of
    the image row over all texts + mean over texts of the cross-entropy of the text row over all images). Returns
    0.5 * (CE sum of this rank's image rows vs all texts + CE sum of its text rows vs all images) / B_global: the
    shares sum over ranks to the global loss.
    """
    dtype = _compute_dtype(image_embeds, text_embeds)
    images, texts = image_embeds.to(dtype), text_embeds.to(dtype)
    all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)
    batch_local, batch_global = images.shape[0], all_texts.shape[0]
    scale = logit_scale.to(dtype).clamp(max=_MAX_LOGIT_SCALE).exp()
    targets = _rank() * batch_local + torch.arange(batch_local, device=images.device)
    # Two (B_local, B_global) blocks: this rank's image rows and its text rows of the global matrix.
    image_loss = F.cross_entropy(scale * images @ all_texts.T, targets, reduction="sum")
    text_loss = F.cross_entropy(scale * texts @ all_images.T, targets, reduction="sum")
    return 0.5 * (image_loss + text_loss) / batch_global


CONTRASTIVE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_contrastive_loss,
    "softmax": softmax_contrastive_loss,
}


__all__ = ["CONTRASTIVE_LOSSES", "gather_with_grad", "sigmoid_contrastive_loss", "softmax_contrastive_loss"]
