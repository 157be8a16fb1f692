"""Which distributed strategy is in force, checked against what the launch asked for, before any training.

Accelerate falls back silently in two ways that matter here (measured on CPU, accelerate 1.16): a config file asking
for FSDP or DeepSpeed on a machine without accelerators runs plain DDP over gloo (it enables FSDP only for
accelerator devices and refuses DeepSpeed on CPU), and a process started by a multi-process launcher without a
distributed state trains its own copy (`DistributedType.NO`). Either way a user would get something else than asked,
or N unsynchronised copies. So the trainer stops at start with a message naming the launch command to use, and logs
the strategy in force.

DeepSpeed has a CPU accelerator that falls back to gloo when oneCCL is missing, and Accelerate's DeepSpeed path runs
on it when the `Accelerator` is built without `cpu=True` and with the gloo backend (`cpu_accelerator_kwargs`); with
`cpu=True` Accelerate would silently run DDP instead. FSDP2 is mended another way: `torch.distributed.fsdp.fully_shard` runs on a CPU device mesh over gloo, so when
an FSDP2 config is launched on CPU processes, `enable_fsdp2_on_cpu` puts Accelerate's state into FSDP with the
launch's plugin (Accelerate's own FSDP2 code path then runs unchanged: `prepare`, `no_sync`, `clip_grad_norm_`, the
full state dict). The same launch command then works on a laptop and on GPU nodes. FSDP1 (flat parameters) is not
offered on CPU and stays refused.
"""

import os
from collections.abc import Mapping


MULTI_PROCESS_COMMAND = "accelerate launch --multi_gpu --num_processes {n} -m finevit_vl.train CONFIG.yaml"
# Accelerate's launcher exports these when its config or flags ask for the strategy.
REQUESTED_BY_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def _asked(strategy: str, env: Mapping[str, str]) -> bool:
    """Whether the launcher's environment asks for `strategy` ("FSDP" or "DEEPSPEED")."""
    return env.get(REQUESTED_BY_ENV[strategy], "").lower() == "true"


def cpu_accelerator_kwargs(env: Mapping[str, str] | None = None) -> dict:
    """`Accelerator` arguments on a machine without accelerators: gloo processes on CPU; for a DeepSpeed launch,
    DeepSpeed's own CPU accelerator over gloo."""
    env = os.environ if env is None else env
    if _asked("DEEPSPEED", env):
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """The engine settings our loop decides (before `prepare`): one DeepSpeed accumulation step per micro-batch,
    with the boundary marked by the trainer on each step's last micro-batch (the count varies with packing), and
    the clipping of `optim.max_grad_norm`."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type.name != "DEEPSPEED" or plugin is None:
        return
    plugin.deepspeed_config.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * accelerator.num_processes,
        "gradient_clipping": float(max_grad_norm or 0.0),
    })


def check_fsdp_version_on_cpu(env: Mapping[str, str] | None = None) -> None:
    """Before the `Accelerator` is built (it builds the FSDP plugin, and FSDP1's refuses CPU with a traceback): on a
    machine without accelerators only FSDP2 is offered."""
    env = os.environ if env is None else env
    version = env.get("FSDP_VERSION", "1")  # Accelerate's default
    if _asked("FSDP", env) and version != "2":
        raise ValueError(
            f"the launch asked for FSDP version {version}, which needs accelerator devices; on CPU processes "
            "FineViT-VL runs FSDP2 (fsdp_version: 2, e.g. train_configs/accelerate/fsdp2.yaml)"
        )


def enable_fsdp2_on_cpu(accelerator, env: Mapping[str, str] | None = None) -> bool:
    """When the launch asked for FSDP2 and Accelerate fell back to gloo DDP (CPU processes), switch its state to FSDP
    with the launch's plugin; returns whether it did. Anything else is left for `check_strategy` to judge."""
    env = os.environ if env is None else env
    state = accelerator.state
    if not _asked("FSDP", env) or accelerator.device.type != "cpu" or state.distributed_type.name != "MULTI_CPU":
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerate builds it
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


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
        if _asked(strategy, env) and in_force != strategy:
            raise ValueError(
                f"the launch asked for {strategy} ({variable}=true) but {in_force} is in force"
                + (" (Accelerate enables FSDP / DeepSpeed only on accelerator devices, and this machine has none)"
                   if str(accelerator.device) == "cpu" else "")
                + f"; to train data-parallel on CPU use `{MULTI_PROCESS_COMMAND.format(n=max(launched, 2))}`, "
                "or run the FSDP / DeepSpeed config on a machine with GPUs"
            )
    return strategy_in_force(accelerator)


__all__ = [
    "check_fsdp_version_on_cpu",
    "check_strategy",
    "configure_deepspeed",
    "cpu_accelerator_kwargs",
    "enable_fsdp2_on_cpu",
    "strategy_in_force",
]
