"""The pretrained base model of the full toy world, shipped in the package so nobody waits for it.

Pretraining the full world (letter-format MCQ skill included) takes longer than ``make demo`` may,
so its result lives in ``toyworld/pretrained/``: the model and tokenizer files, and ``world.json``
naming the world config, the world format, the CPU threads it was pretrained with and the SHA-256
of every file. :func:`~sequnlearn.toyworld.build.build_world` copies it whenever the asked-for
config is the shipped one; ``sequnlearn toyworld build --pretrain`` pretrains instead, with the
shipped thread count, which rebuilds the same bytes on the same torch version and CPU kind (float
sums in another order, from another thread count or another SIMD path, give other weights).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "pretrained"
"""Where the shipped model lives (package data)."""

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""Files of a world's ``model/`` directory that are shipped (those :meth:`save_pretrained` writes)."""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hashes(model_dir: Path) -> dict[str, str]:
    """SHA-256 of each of :data:`MODEL_FILES` present in ``model_dir``."""
    return {name: sha256(model_dir / name) for name in MODEL_FILES if (model_dir / name).is_file()}


def shipped_info(root: Path = SHIPPED_DIR) -> dict | None:
    """The shipped ``world.json``, or None when nothing is shipped (or it is unreadable)."""
    try:
        return json.loads((root / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shipped_for(config, world_format: int, root: Path = SHIPPED_DIR) -> dict | None:
    """The shipped ``world.json`` when it was built from ``config`` in ``world_format``, else None.

    Every file it lists must be there with its recorded hash; a damaged copy is not used.
    """
    info = shipped_info(root)
    if not info or info.get("format") != world_format or info.get("config") != config.to_dict():
        return None
    hashes = info.get("sha256") or {}
    if not hashes or any(not (root / n).is_file() or sha256(root / n) != h for n, h in hashes.items()):
        return None
    return info


def copy_shipped(dest: Path, root: Path = SHIPPED_DIR) -> None:
    """Copy the shipped model files into the (new, empty) directory ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in shipped_info(root)["sha256"]:
        shutil.copyfile(root / name, dest / name)


def ship(model_dir: Path, world_info: dict, root: Path = SHIPPED_DIR) -> dict:
    """Make a built world's model the shipped one (a maintainer's step after a ``--pretrain`` build).

    Args:
        model_dir: the built world's ``model/`` directory.
        world_info: its ``world.json``.
        root: the shipped directory (replaced).

    Returns:
        The shipped ``world.json`` written.
    """
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, root / name)
    keep = ("format", "seed", "config", "vocab_size", "model_parameters", "final_pretrain_loss", "pretrain_threads",
            "pretrain_seconds", "torch_version", "base_accuracy")
    info = {k: world_info[k] for k in keep if k in world_info}
    info["sha256"] = model_hashes(root)
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
