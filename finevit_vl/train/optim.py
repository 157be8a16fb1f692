"""AdamW with one learning rate per module, and a linear-warmup + cosine schedule."""

import math

import torch
from torch import nn

from .config import Config
from .freeze import module_of


def group_lr(module: str, config: Config) -> float:
    return getattr(config.modules, module).lr or config.optim.lr


def param_groups(model: nn.Module, config: Config) -> list[dict]:
    """Trainable parameters grouped by (module, decay): each module gets its own `lr`; biases and norms no decay."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        module = module_of(name)
        decay = parameter.ndim >= 2 and config.optim.weight_decay > 0
        lr = group_lr(module, config)
        group = groups.setdefault(
            (module, decay),
            {"params": [], "lr": lr, "weight_decay": config.optim.weight_decay if decay else 0.0, "name": f"{module}{'' if decay else '/no_decay'}"},
        )
        group["params"].append(parameter)
    if not groups:
        raise ValueError("no trainable parameters: check modules.*.train and lora settings")
    return list(groups.values())


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, config), betas=config.optim.betas, eps=config.optim.eps)


def warmup_steps(config: Config) -> int:
    if config.optim.warmup_steps is not None:
        return config.optim.warmup_steps
    return round(config.optim.warmup_ratio * config.train.max_steps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `config` positioned after `step` optimizer steps.

    On resume the base learning rates come from `config`, not from the optimizer state, so a deliberately changed
    learning rate (or step budget) takes effect from the next step. `train.phases` can gate a module's rate to 0
    (`finevit_vl.train.phases`).
    """
    from .phases import PhaseSchedule

    phases = PhaseSchedule(config.train.phases)
    for group in optimizer.param_groups:
        group["initial_lr"] = group_lr(group["name"].split("/")[0], config)
    warmup, total, min_ratio = warmup_steps(config), config.train.max_steps, config.optim.min_lr_ratio

    def factor(module: str):
        return lambda s: lr_factor(s, warmup, total, min_ratio) * phases.lr_gate(module, s)

    lambdas = [factor(group["name"].split("/")[0]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=step - 1)


__all__ = ["build_optimizer", "build_scheduler", "group_lr", "lr_factor", "param_groups"]
