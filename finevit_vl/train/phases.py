"""A stage's schedule in phases (`train.phases`): the pixel budget, the caption length and the text tower's freezing,
each changing at a given step (FineViT Stage II: 336 -> 448 px native, text 64 -> 256 tokens, the text tower frozen
at first and trained later); and GranViT's two phases inside one run: which modules are frozen, which direction the
region turns take, and the self-distillation weight.

The settings in force are a function of the step alone, so a resumed run is in the same phase as the run it
continues. A new pixel budget or text length applies to records encoded from that step on: the trainer stops
prefetching at each phase boundary and the stream rebuilds its loader (workers included) with the new settings,
keeping its position. Freezing is a learning-rate gate (0 while frozen), not `requires_grad`: DDP and FSDP need one
fixed set of trainable parameters for the whole run (a frozen module's AdamW moments still follow its gradients; its
weights, weight decay included, do not move).
"""

import logging
import math


logger = logging.getLogger(__name__)

SETTINGS = ("min_pixels", "max_pixels", "text_max_length", "train_text_tower", "frozen_modules", "region_directions",
            "distill_weight")


class PhaseSchedule:
    def __init__(self, phases: list) -> None:
        self.phases = sorted(phases, key=lambda phase: phase.start_step)

    def at(self, step: int) -> dict:
        """The settings in force at `step` (later phases override earlier ones; unset: not scheduled)."""
        settings: dict = {}
        for phase in self.phases:
            if phase.start_step > step:
                break
            settings.update({name: getattr(phase, name) for name in SETTINGS if getattr(phase, name) is not None})
        return settings

    def next_start(self, step: int) -> float:
        """The first phase boundary after `step` (infinity when none)."""
        return next((phase.start_step for phase in self.phases if phase.start_step > step), math.inf)

    def lr_gate(self, module: str, step: int) -> float:
        """Multiplier of `module`'s learning rate at optimizer step `step`: 0 while the schedule freezes it."""
        settings = self.at(step)
        if module == "text_tower" and settings.get("train_text_tower") is False:
            return 0.0
        return 0.0 if module in (settings.get("frozen_modules") or ()) else 1.0

    def apply(self, trainer, step: int) -> float:
        """Configure the trainer's stream for the phase in force at `step`; returns where the phase ends."""
        settings = self.at(step)
        if settings:
            logger.info("step %d: phase settings %s", step, settings)

            def change(encoder) -> None:
                if "min_pixels" in settings or "max_pixels" in settings:
                    target = getattr(encoder, "processor", None)
                    if target is None or not hasattr(target, "set_pixel_budget"):
                        target = encoder.image_processor
                        target.min_pixels = settings.get("min_pixels", target.min_pixels)
                        target.max_pixels = settings.get("max_pixels", target.max_pixels)
                    else:
                        target.set_pixel_budget(settings.get("min_pixels"), settings.get("max_pixels"))
                if "text_max_length" in settings:
                    if not hasattr(encoder, "text_max_length"):
                        raise ValueError("train.phases sets text_max_length, which only objective contrastive has")
                    encoder.text_max_length = settings["text_max_length"]
                    trainer.processor.text_max_length = settings["text_max_length"]  # exported with the model
                if "region_directions" in settings:
                    if not hasattr(encoder, "region_directions"):
                        raise ValueError("train.phases sets region_directions, which only objective next_token has")
                    encoder.region_directions = settings["region_directions"]

            trainer.stream.reconfigure(change)
            if "distill_weight" in settings:
                trainer.distill_weight = settings["distill_weight"]
        return self.next_start(step)


__all__ = ["PhaseSchedule"]
