"""Shared test setup: offline hub, few threads, tiny seeded models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def padded_batch():
    """A right-padded ``(3, 11)`` batch of byte tokens with three different lengths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 256
    return ids, mask


def tree_hashes(*roots) -> dict[str, str]:
    """SHA-256 of every file (and ``dir`` for every directory) under each of ``roots``, keyed by path.

    Compare a snapshot taken before a command with one taken after it to prove that the command
    changed nothing that existed (``nothing existing is lost``)."""
    import hashlib
    from pathlib import Path

    out: dict[str, str] = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def snapshot():
    """:func:`tree_hashes` as a fixture: ``before = snapshot(a, b)``; ... ``assert snapshot(a, b) == before``."""
    return tree_hashes
