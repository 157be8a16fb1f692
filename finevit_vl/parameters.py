"""Which parameters a FineViT-VL model counts, and as how many values: the one owner of parameter counting, shared by
the model card (`count_parameters`) and the trainer's per-module reports (`finevit_vl.train.freeze`, `.metrics`)."""

from torch import nn


def is_peft_original(parameter_name: str) -> bool:
    """PEFT keeps the untouched original of every `modules_to_save` module next to its trained copy; it is not run."""
    return "original_module" in parameter_name.split(".")


def value_count(parameter: nn.Parameter) -> int:
    """Values the parameter holds: a 4-bit weight packs two values per stored byte, so it holds twice its `numel`."""
    return parameter.numel() * (2 if getattr(parameter, "quant_state", None) is not None else 1)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model as exported: LoRA layers still attached before a merge are not counted, and 4-bit
    weights count as the values they hold."""
    return sum(
        value_count(parameter)
        for name, parameter in model.named_parameters()
        if "lora_" not in name and not is_peft_original(name)
    )


__all__ = ["count_parameters", "is_peft_original", "value_count"]
