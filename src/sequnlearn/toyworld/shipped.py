"""A pretrained base model shipped in the package, so a build need not pretrain it.

When pretraining the full world takes longer than ``make demo`` may, its result can live in
``toyworld/pretrained/`` (``sequnlearn toyworld build --out DIR --pretrain --ship``): the model and
tokenizer files, and ``world.json`` naming the world config, the world format, the CPU threads it
was pretrained with and the SHA-256 of every file. :func:`~sequnlearn.toyworld.build.build_world`
copies it whenever the asked-for config is the shipped one; ``--pretrain`` pretrains instead, with
the shipped thread count, which rebuilds the same bytes on the same torch version and CPU kind
(another thread count or SIMD path sums floats in another order and gives other weights). The
default world's model is shipped: ``make demo`` copies it instead of pretraining, and
``SEQUNLEARN_REBUILD_TEST=1 pytest -k rebuilds_the_shipped_full`` checks the rebuild.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "pretrained"
"""Where the shipped model lives (package data); absent until a model is shipped, and then every
build of another config (the reduced one, ``--set`` changes) still pretrains."""

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""Files of a world's ``model/`` directory that are shipped (those :meth:`save_pretrained` writes)."""

PRETRAIN_LOG = "pretrain_log.jsonl"
"""The world's pretraining log, shipped alongside (it is part of a finished world)."""


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


def shipped_info(root: Path | None = None) -> dict | None:
    """The shipped ``world.json``, or None when nothing is shipped (or it is unreadable)."""
    root = root or SHIPPED_DIR
    try:
        return json.loads((root / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shipped_for(config, world_format: int, root: Path | None = None) -> dict | None:
    """The shipped ``world.json`` when it was built from ``config`` in ``world_format``, else None.

    Every file it lists must be there with its recorded hash; a damaged copy is not used.
    """
    root = root or SHIPPED_DIR
    info = shipped_info(root)
    if not info or info.get("format") != world_format or config.differences(info.get("config")):
        return None
    hashes = info.get("sha256") or {}
    if not hashes or not (root / PRETRAIN_LOG).is_file() or any(not (root / n).is_file() or sha256(root / n) != h for n, h in hashes.items()):
        return None
    return info


def copy_shipped(dest: Path, root: Path | None = None) -> None:
    """Copy the shipped model files and the pretraining log into the (new, empty) directory ``dest``."""
    root = root or SHIPPED_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in [*shipped_info(root)["sha256"], PRETRAIN_LOG]:
        shutil.copyfile(root / name, dest / name)


def ship(model_dir: Path, world_info: dict, root: Path | None = None) -> dict:
    """Make a built world's model the shipped one (a maintainer's step after a ``--pretrain`` build).

    Args:
        model_dir: the built world's ``model/`` directory (its ``pretrain_log.jsonl`` is next to it).
        world_info: its ``world.json``.
        root: the shipped directory (replaced); default :data:`SHIPPED_DIR`.

    Returns:
        The shipped ``world.json`` written.
    """
    root = root or SHIPPED_DIR
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, root / name)
    shutil.copyfile(model_dir.parent / PRETRAIN_LOG, root / PRETRAIN_LOG)  # provenance; times differ per run, no hash
    keep = ("format", "seed", "config", "vocab_size", "model_parameters", "final_pretrain_loss", "pretrain_threads",
            "pretrain_seconds", "torch_version", "base_accuracy")
    info = {k: world_info[k] for k in keep if k in world_info}
    info["sha256"] = model_hashes(root)
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
