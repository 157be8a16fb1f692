"""Graceful preemption: SIGTERM (a cluster's preemption, `scancel`) and SIGINT (Ctrl-C) finish the current step,
save a checkpoint and exit with `INTERRUPTED_EXIT_CODE`, so a job script can requeue and resume with the same command.

A second SIGINT interrupts at once (the checkpoint then is the previous one). The request is agreed over all ranks
at each step boundary, so every rank saves the same step even when only one of them received the signal.
"""

import logging
import signal
import threading
from types import FrameType
from typing import Self

import torch


logger = logging.getLogger(__name__)

# EX_TEMPFAIL: a temporary failure, the caller may retry (requeue) and the run resumes from its checkpoint.
INTERRUPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Raised after the checkpoint of an interrupted run is written."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(f"{signal_name} received: stopped after step {step}, checkpoint {checkpoint}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into a flag checked between steps."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            logger.warning("%s received: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)",
                           signal.Signals(signum).name)
        self.received = self.received or signum

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a stop request"

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank was signalled (a collective when there are several processes)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received or 0), device=accelerator.device)
        agreed = int(accelerator.reduce(flag, reduction="max"))
        if agreed and self.received is None:
            self.received = agreed
        return bool(agreed)


__all__ = ["INTERRUPTED_EXIT_CODE", "StopRequest", "TrainingInterrupted"]
