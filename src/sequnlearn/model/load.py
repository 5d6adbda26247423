"""Load a causal LM and its tokenizer from a hub id or a local directory."""

from __future__ import annotations

from pathlib import Path

import torch

from sequnlearn.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map ``fp32``/``bf16``/``fp16``/``auto`` to a torch dtype (``auto``: bf16 on GPU, fp32 on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is unknown; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_source(path_or_id: str) -> str:
    """Return the directory holding an HF model for a run directory, a model directory or a hub id.

    A run directory (``runs/NAME`` with ``model/config.json``) resolves to its merged model.

    Raises:
        UserError: a local path that exists (or looks like a path) but holds no model.
    """
    p = Path(path_or_id)
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    if (p / "config.json").is_file():
        return str(p)
    looks_local = p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_local:
        if not p.exists():
            raise UserError(f"model path {path_or_id} does not exist; give a local model directory or a hub id")
        raise UserError(f"{path_or_id} holds no model (no config.json); point at an HF model directory or a finished run")
    return path_or_id


def load_tokenizer(source: str, revision: str | None = None):
    """Tokenizer with right padding and a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer from {source!r} ({_short(e)}); check the id or provide a local copy") from e
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise UserError(f"tokenizer of {source!r} has no pad, eos or unk token; add a pad token to it")
    return tok


def load_model(path_or_id: str, *, dtype: str = "auto", device: str = "auto", revision: str | None = None):
    """Load ``(model, tokenizer)``; the model is in eval mode on ``device``.

    Args:
        path_or_id: hub id, HF model directory, a run directory with ``model/``, or
            ``tiny:FAMILY`` for a random tiny model built from a config (seed 0).
        dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...

    Raises:
        UserError: nothing loadable there, or the architecture is not supported.
    """
    from transformers import AutoModelForCausalLM

    from sequnlearn.model.layers import architecture

    dev = resolve_device(device)
    if path_or_id.startswith("tiny:"):
        return _tiny(path_or_id.split(":", 1)[1], dev)
    source = model_source(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        raise UserError(f"cannot load model {source!r} ({_short(e)}); check the id, or download it and pass the local directory") from e
    architecture(model)  # fail early on an architecture we do not know
    model.to(dev).eval()
    return model, load_tokenizer(source, revision)


def _tiny(family: str, device: torch.device):
    from sequnlearn.model.tiny import TINY_FAMILIES, byte_tokenizer, tiny_model

    if family not in TINY_FAMILIES:
        raise UserError(f"tiny model {family!r} is unknown; use one of " + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
    return tiny_model(family).to(device), byte_tokenizer()


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
