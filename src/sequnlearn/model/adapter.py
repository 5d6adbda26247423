"""The LoRA adapter: which modules it targets, how it is attached, merged and saved."""

from __future__ import annotations

import warnings

from torch import nn

from sequnlearn.errors import UserError


def lora_targets(model: nn.Module, target_modules: str | list[str]):
    """Resolve ``target_modules`` to what peft's ``LoraConfig`` takes.

    Args:
        target_modules: ``all-linear`` (every linear layer except the output head — the
            reference's "default (all linear layers)"), ``peft-default`` (peft's per-model
            default, e.g. only ``query_key_value`` for GPT-NeoX) or a list of module names.
    """
    if target_modules == "all-linear":
        return "all-linear"
    if target_modules == "peft-default":
        return None
    if isinstance(target_modules, (list, tuple)) and target_modules:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in target_modules if t not in names]
        if missing:
            raise UserError(f"target_modules {missing} match no module of this model; "
                            f"some module names it has: {', '.join(sorted(names)[:12])}")
        return list(target_modules)
    raise UserError(f"target_modules {target_modules!r} is not valid; use all-linear, peft-default or a list of names")


def add_lora(model: nn.Module, *, r: int, alpha: int, dropout: float, target_modules):
    """Wrap ``model`` in a peft LoRA model; only the adapter is trainable.

    The original model stays reachable as the same weights with the adapter switched off.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                     target_modules=lora_targets(model, target_modules))
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def lora_dropout_train_mode(model: nn.Module) -> None:
    """Eval mode everywhere except the LoRA dropouts, so the original model is deterministic."""
    model.eval()
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            module.train()


def merge_adapter(peft_model):
    """Merge the adapter into the base weights in place and return the plain HF model."""
    return peft_model.merge_and_unload()
