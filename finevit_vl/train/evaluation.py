"""Evaluation during training: the held-out loss on the eval records, and the lmms-eval suite hook."""

import logging

import torch

from ..data import BadRecordError
from ..data.collator import EncodedSample, SampleEncoder, collate_rows, filler_batch
from .data import BadRecordLog
from .loss import num_targets


logger = logging.getLogger(__name__)


def load_eval_samples(source, encoder: SampleEncoder, max_samples: int, rank: int, world_size: int,
                      bad_records: BadRecordLog) -> list[EncodedSample]:
    """This rank's share (`index % world_size == rank`) of the first `max_samples` usable eval records."""
    samples: list[EncodedSample] = []
    usable = 0
    for record, location in source:
        if usable >= max_samples:
            break
        try:
            sample = encoder.encode_record(record, location)
        except BadRecordError as error:
            bad_records.add(error, split="eval")
            continue
        if usable % world_size == rank:
            samples.append(sample)
        usable += 1
    return samples


class HeldOutLoss:
    """Token-weighted mean next-token loss over the eval samples of all ranks.

    Every rank runs the same number of forwards (empty ones are a dummy text row), so sharded engines never hang.
    """

    def __init__(
        self, samples: list[EncodedSample], micro_batch_size: int, pad_token_id: int, dummy_image: dict[str, torch.Tensor]
    ) -> None:
        self.batches = [
            collate_rows([[s] for s in samples[i : i + micro_batch_size]], pad_token_id, dummy_image)
            for i in range(0, len(samples), micro_batch_size)
        ]
        self.filler = filler_batch(pad_token_id, dummy_image)

    @torch.no_grad()
    def __call__(self, trainer) -> dict:
        accelerator = trainer.accelerator
        count = int(accelerator.reduce(torch.tensor(len(self.batches), device=accelerator.device), reduction="max"))
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        targets = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        trainer.model.eval()
        for index in range(count):
            batch = self.batches[index] if index < len(self.batches) else self.filler
            losses = trainer.token_losses(batch)
            loss_sum += losses.sum().double()
            targets += num_targets(batch["labels"])
        trainer.model.train()
        totals = accelerator.reduce(torch.stack([loss_sum, targets]), reduction="sum")
        return {"eval_loss": float(totals[0] / totals[1].clamp(min=1)), "eval_targets": int(totals[1])}


def run_eval_suite(model, processor, tasks: list[str], out_dir: str, limit: int | None, data_dir: str | None,
                   batch_size: int, model_args: dict | None = None) -> dict | None:
    """Call `finevit_vl.eval.suite.run_eval_suite` (imported lazily); `None` with a warning if it is unavailable.

    Under several processes every rank must call it (lmms-eval shards the documents and gathers on rank 0).
    """
    try:
        from ..eval.suite import run_eval_suite as suite
    except ImportError as error:
        logger.warning("eval.tasks is set but the lmms-eval suite is unavailable (%s); install finevit-vl[eval]. "
                       "Skipping; run `finevit-vl eval` on the exported checkpoint later.", error)
        return None
    return suite(model, processor=processor, tasks=tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,
                 out_dir=out_dir, model_args=model_args)


__all__ = ["HeldOutLoss", "load_eval_samples", "run_eval_suite"]
