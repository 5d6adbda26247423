"""Load a causal LM and its tokenizer from a hub id or a local directory."""

from __future__ import annotations

from pathlib import Path

import torch

from sequnlearn.errors import UserError, warn

#: Model types whose positions are a learned embedding table: inputs past it cannot run at all.
LEARNED_POSITIONS = ("gpt2", "gpt_neo", "opt", "gpt_bigcode")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch has no usable CUDA GPU (torch {torch.__version__}, "
                            f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0 .. "
                            f"cuda:{torch.cuda.device_count() - 1}")
    elif dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise UserError(f"--device {device}: this torch cannot use an {dev.type} device here; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


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


def model_reference(path_or_id: str) -> str:
    """How a saved artifact names the model a run started from, so it loads from any directory: the
    absolute path of a local model (a run directory resolves to its ``model/``), the hub id of a hub
    model, and ``tiny:FAMILY`` as it is (built from a config: nothing to load it from).

    Raises:
        UserError: as :func:`model_source`.
    """
    if path_or_id.startswith("tiny:"):
        return path_or_id
    source = model_source(path_or_id)
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """Save ``tokenizer`` (HF format) without the truncation and padding training left on it.

    transformers sets a fast tokenizer's truncation and padding per call, on its backend, and
    leaves them there: after ``truncation=True, max_length=L`` ``save_pretrained`` would write that
    into ``tokenizer.json``, and the ``tokenizers`` library would cut every text at the run's
    ``max_length``. A copy with neither is saved; ``tokenizer`` itself is not changed."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(str(path))


def load_tokenizer(source: str, revision: str | None = None):
    """Tokenizer with right padding and a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except Exception as e:  # noqa: BLE001 - OSError when absent; tokenizers' own errors when damaged
        raise UserError(f"cannot load a tokenizer from {source!r} ({_short(e)}); check the id or provide a local copy") from None
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
    if Path(source).is_dir():
        check_model_dir(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        raise UserError(f"cannot load model {source!r} ({_short(e)}); check the id, or download it and pass the local directory") from e
    architecture(model)  # fail early on an architecture we do not know
    tokenizer = load_tokenizer(source, revision)
    check_vocab(len(tokenizer), model.get_input_embeddings().num_embeddings, source)
    model.to(dev).eval()
    return model, tokenizer


def check_model_dir(path: str) -> dict:
    """Check a local model directory before loading it: config, every weight shard there and whole.

    Returns:
        Its ``config.json``.

    Raises:
        UserError: damaged config, a shard listed in the index that is missing, a truncated shard.
    """
    from sequnlearn import io

    root = Path(path)
    config = io.read_json(root / "config.json", "model config", kind=dict)
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        if (root / index_name).exists():
            index = io.read_json(root / index_name, "weight index", kind=dict)
            shards = sorted(set(io.expect(index.get("weight_map"), dict, f"weight index {root / index_name}",
                                          "download the model again").values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise UserError(f"model directory {root} is missing weight shard {missing[0]} (listed in "
                                f"{index_name}, {len(missing)} of {len(shards)} missing); download the model again")
            if fmt == "safetensors":
                for shard in shards:
                    io.check_safetensors(root / shard)
            return config
    if (root / "model.safetensors").exists():
        io.check_safetensors(root / "model.safetensors")
    return config


def check_vocab(tokenizer_size: int, embeddings: int, source: str) -> None:
    """A tokenizer whose ids reach past the model's embedding table cannot run.

    Raises:
        UserError: ``tokenizer_size`` > ``embeddings``.
    """
    if tokenizer_size > embeddings:
        raise UserError(f"the tokenizer of {source} has {tokenizer_size} tokens but the model only {embeddings} "
                        "embeddings; use the tokenizer the model was trained with (or resize its embeddings)")


def check_positions(config: dict, max_length: int, source: str) -> None:
    """``max_length`` above the model's trained positions: an error for learned position
    embeddings (the lookup fails), a warning for rotary/relative ones (quality drops)."""
    n = config.get("n_positions") or config.get("max_position_embeddings")
    if not n or max_length <= n:
        return
    if config.get("model_type") in LEARNED_POSITIONS:
        raise UserError(f"max_length {max_length} is above the {n} positions model {source} was trained with "
                        f"(learned position embeddings); set max_length to {n} or less")
    warn(f"max_length {max_length} is above the {n} positions model {source} was trained with; "
         "it runs, but past them the model is out of distribution")


def inspect_model(path_or_id: str, *, max_length: int | None = None) -> None:
    """Every check :func:`load_model` makes that needs no weights (a local model; hub ids pass).

    Raises:
        UserError: no model there, a damaged directory, a tokenizer too large, max_length too large.
    """
    if path_or_id.startswith("tiny:"):
        return
    source = model_source(path_or_id)
    if not Path(source).is_dir():
        return
    config = check_model_dir(source)
    if max_length is not None:
        check_positions(config, max_length, source)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if vocab:
        check_vocab(len(load_tokenizer(source)), vocab, source)


def _tiny(family: str, device: torch.device):
    from sequnlearn.model.tiny import TINY_FAMILIES, byte_tokenizer, tiny_model

    if family not in TINY_FAMILIES:
        raise UserError(f"tiny model {family!r} is unknown; use one of " + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
    return tiny_model(family).to(device), byte_tokenizer()


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_fingerprint(path_or_id: str, model=None) -> dict:
    """What identifies a model's weights, for provenance and ``--resume``.

    A local directory: the SHA-256 over its weight files (names, sizes and bytes). A hub model: its
    resolved commit (``config._commit_hash``) when ``model`` was loaded from the hub. A ``tiny:``
    model: nothing to hash (it is built from a config, seed 0).
    """
    import hashlib

    if path_or_id.startswith("tiny:"):
        return {"source": path_or_id, "weights_sha256": None}
    source = model_source(path_or_id)
    if not Path(source).is_dir():
        return {"source": source, "commit": getattr(getattr(model, "config", None), "_commit_hash", None)}
    h = hashlib.sha256()
    for f in sorted(p for p in Path(source).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return {"source": str(Path(source).resolve()), "weights_sha256": h.hexdigest()}
