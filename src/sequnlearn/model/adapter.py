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


def save_adapter(peft_model, path, cfg: dict, run_name: str) -> None:
    """Save the adapter (peft format) so that it loads from any directory, with a README of our own.

    ``adapter_config.json`` names the base model by :func:`~sequnlearn.model.load.model_reference`
    (an absolute path, a hub id and its revision, or ``tiny:FAMILY``), and ``README.md`` (written over
    peft's blank template) says what the adapter is: method, base model, target layers, and where the
    run's model card is.

    Args:
        path: the (temp) adapter directory.
        cfg: the run's resolved config (``config.yaml``).
        run_name: the run directory's name.
    """
    from pathlib import Path

    from sequnlearn.model.load import model_reference
    from sequnlearn.runs import atomic_write_text

    base = model_reference(str(cfg["model"]))
    for conf in peft_model.peft_config.values():
        conf.base_model_name_or_path, conf.revision = base, cfg.get("revision")
    # The base embeddings are never changed: without this, peft would look the base model up (on the
    # hub for a hub id) to see whether the vocabulary was resized.
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    depth = getattr(peft_model.config, "num_hidden_layers", None)
    atomic_write_text(Path(path) / "README.md", adapter_readme(cfg, base, run_name, depth))


def adapter_readme(cfg: dict, base: str, run_name: str, num_layers: int | None = None) -> str:
    """The adapter's ``README.md`` (a Hugging Face card): method, base model, target layers, model card link.

    ``num_layers``: the model's depth (what ``layer_start: null`` means)."""
    from pathlib import Path

    from sequnlearn.config import stored_target_layers

    layers = stored_target_layers(cfg, num_layers)
    hub = not base.startswith("tiny:") and not Path(base).is_absolute()
    meta = "---\nlibrary_name: peft\n" + (f"base_model: {base}\n" if hub else "") + \
        "tags:\n- sequnlearn\n- unlearning\n- lora\n---\n"
    how = ("```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
           "model = AutoPeftModelForCausalLM.from_pretrained(\"PATH/TO/THIS/adapter\")  # loads the base model too\n```"
           if not base.startswith("tiny:") else
           f"`{base}` is a random tiny model sequnlearn builds from a config (`sequnlearn.model.load.load_model"
           f"(\"{base}\")`); attach this adapter to it with "
           "`peft.PeftModel.from_pretrained(model, \"PATH/TO/THIS/adapter\")`.")
    return "\n".join([
        meta, f"# LoRA adapter of sequnlearn run {run_name}", "",
        "The LoRA adapter that sequnlearn's sequential back-to-front unlearning trained; merged into the base "
        "model it gives the run's unlearned model (`../model/`).", "",
        f"- base model: `{base}`" + (f" (revision `{cfg['revision']}`)" if cfg.get("revision") else ""),
        f"- method: sequential back-to-front unlearning over target layers {layers} (in that order); forget loss "
        f"`{cfg.get('forget_loss')}` (coefficient {cfg.get('remove_coef')}), retain loss `{cfg.get('retain_loss')}` "
        f"(coefficient {cfg.get('retain_coef')})",
        f"- LoRA: r={cfg.get('lora_r')}, alpha={cfg.get('lora_alpha')}, dropout {cfg.get('lora_dropout')}, "
        f"targets `{cfg.get('target_modules')}`",
        "- model card (what was unlearned, evaluation, tampering attack, provenance, full config): "
        "[../model/README.md](../model/README.md)", "",
        "Unlearning is not proven safe: see the model card's warning before you use or release this.", "",
        "## Load", "", how, ""])
