"""Which distributed strategy is in force, checked against what the launch asked for, before any training.

Accelerate falls back silently in two ways that matter here (measured on CPU, accelerate 1.16): a config file asking
for FSDP or DeepSpeed on a machine without accelerators runs plain DDP over gloo (it enables FSDP only for
accelerator devices and refuses DeepSpeed on CPU), and a process started by a multi-process launcher without a
distributed state trains its own copy (`DistributedType.NO`). Either way a user would get something else than asked,
or N unsynchronised copies. So the trainer stops at start with a message naming the launch command to use, and logs
the strategy in force.
"""

import os
from collections.abc import Mapping


MULTI_PROCESS_COMMAND = "accelerate launch --multi_gpu --num_processes {n} -m finevit_vl.train CONFIG.yaml"
# Accelerate's launcher exports these when its config or flags ask for the strategy.
REQUESTED_BY_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def strategy_in_force(accelerator) -> str:
    """One line for the log: the distributed type, backend and process count."""
    state = accelerator.state
    backend = getattr(state, "backend", None) or "none"
    name = str(accelerator.distributed_type).split(".")[-1]
    return f"{name} over {backend}, {accelerator.num_processes} process(es), device {accelerator.device}"


def check_strategy(accelerator, env: Mapping[str, str] | None = None) -> str:
    """Raise `ValueError` when the processes launched or the strategy asked for are not what is in force; else return
    `strategy_in_force(accelerator)`."""
    env = os.environ if env is None else env
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    in_force = str(accelerator.distributed_type).split(".")[-1]
    if launched > 1 and (accelerator.num_processes != launched or in_force == "NO"):
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but this one is not part of a distributed run "
            f"({in_force}, {accelerator.num_processes} process): each would train its own copy. Launch with "
            f"`{MULTI_PROCESS_COMMAND.format(n=launched)}` (on CPU-only machines this runs gloo processes)"
        )
    for strategy, variable in REQUESTED_BY_ENV.items():
        if env.get(variable, "").lower() == "true" and in_force != strategy:
            raise ValueError(
                f"the launch asked for {strategy} ({variable}=true) but {in_force} is in force"
                + (" (Accelerate enables FSDP / DeepSpeed only on accelerator devices, and this machine has none)"
                   if str(accelerator.device) == "cpu" else "")
                + f"; to train data-parallel on CPU use `{MULTI_PROCESS_COMMAND.format(n=max(launched, 2))}`, "
                "or run the FSDP / DeepSpeed config on a machine with GPUs"
            )
    return strategy_in_force(accelerator)


__all__ = ["check_strategy", "strategy_in_force"]
