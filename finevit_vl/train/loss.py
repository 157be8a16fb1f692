"""Next-token loss, summed per token: the trainer weights every supervised token of a global batch equally.

Summing (not averaging) per micro-batch and dividing by the global token count makes the loss independent of how
samples are split across micro-batches, ranks and packed rows: 1 process with 2 accumulation steps, 2 processes with
1, and packed or padded batches all optimise the same objective.
"""

import torch
import torch.nn.functional as F

from ..data.collator import IGNORE_INDEX


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next-token prediction in fp32, 0 where the target is ignored.

    Args:
        logits (`torch.Tensor` of shape `(rows, len, vocab)`).
        labels (`torch.LongTensor` of shape `(rows, len)`): targets, -100 ignored; shifted here.

    Returns:
        `torch.Tensor` of shape `(rows, len - 1)`: loss of predicting token t + 1 from position t.
    """
    # (rows, len - 1, vocab) -> (rows * (len - 1), vocab); upcast for a stable log-softmax under bf16.
    shift_logits = logits[:, :-1].float().flatten(0, 1)
    shift_labels = labels[:, 1:].flatten()
    losses = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(labels.shape[0], -1)


def num_targets(labels: torch.Tensor) -> int:
    """Supervised next-token targets in `labels` (the first position is never a target)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sample of a (possibly packed) micro-batch, `(num_samples,)`.

    `sample_ids` `(rows, len)` numbers the samples of the micro-batch (-1 on padding), as `collate_rows` returns it.
    """
    losses = token_losses(logits, labels).flatten()
    owners = sample_ids[:, 1:].flatten()
    keep = (labels[:, 1:].flatten() != IGNORE_INDEX) & (owners >= 0)
    num_samples = int(sample_ids.max()) + 1
    sums = torch.zeros(num_samples, dtype=losses.dtype, device=losses.device).index_add_(0, owners[keep], losses[keep])
    counts = torch.zeros(num_samples, dtype=losses.dtype, device=losses.device).index_add_(
        0, owners[keep], torch.ones_like(losses[keep])
    )
    return sums / counts.clamp(min=1)


__all__ = ["num_targets", "per_sample_losses", "token_losses"]
