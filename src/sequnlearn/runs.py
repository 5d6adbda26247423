"""Run-directory layout, atomic writes and provenance.

Every file the tools write goes through :func:`atomic_write_text` (temp file in the same
directory, fsync, rename), so a kill never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sequnlearn.errors import UserError


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (the unit of every result)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    def is_run(self) -> bool:
        """True when the directory holds a run (its resolved config exists)."""
        return self.config.is_file()

    def is_finished(self) -> bool:
        """True when the merged model has been written."""
        return (self.model / "config.json").is_file()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete the temp files (:func:`atomic_path`'s ``.NAME.XXXX.tmp``) a killed writer left under
    ``root``; returns them. Run before resuming: the file each one was meant to replace is intact."""
    stale = [p for p in Path(root).rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a missing file is an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically with ``rows``."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def prepare_out_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check that ``out`` may be written and create it.

    Raises:
        UserError: ``out`` is non-empty without ``resume``/``overwrite``, or ``resume`` was
            asked for on a directory that holds no run.
    """
    out = Path(out)
    non_empty = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    if resume:
        if not RunDir(out).is_run():
            raise UserError(f"--resume: {out} holds no run (no config.yaml); drop --resume to start a new run")
        return out
    if non_empty and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --resume to continue it or --overwrite to replace it")
    if non_empty and overwrite:
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _git(*args: str) -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: str | None = None) -> dict:
    """Git commit, dirty flag, package versions, device, host and start time."""
    from importlib.metadata import PackageNotFoundError, version

    pkgs = {}
    for name in ("sequnlearn", "torch", "transformers", "peft", "accelerate", "datasets", "lm-eval"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    status = _git("status", "--porcelain")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "packages": pkgs,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "argv": sys.argv,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "end_time": None,
    }
