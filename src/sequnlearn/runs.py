"""Run-directory layout, atomic writes and provenance.

Every file the tools write goes through :func:`atomic_write_text` (temp file in the same
directory, fsync, rename), so a kill never leaves a truncated file behind.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
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
    overwrite: bool = False
    """:meth:`claim` empties a non-empty directory first (``--overwrite``)."""

    def claim(self) -> Path:
        """Create the directory just before its first file is written (see :func:`claim_out_dir`)."""
        return claim_out_dir(self.root, overwrite=self.overwrite)

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


def run_of_model(path: str | os.PathLike) -> RunDir | None:
    """The finished run a model path belongs to (the run directory or its ``model/``), else ``None``."""
    p = Path(path)
    for root in (p, p.parent if p.name == "model" else None):
        if root is not None and RunDir(root).is_run() and RunDir(root).is_finished():
            return RunDir(root)
    return None


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
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            kept = "the previous one is intact" if path.exists() else "nothing was written"
            raise UserError(f"cannot write {path} ({os.strerror(e.errno)}); {kept}; free space, then run the "
                            "command again (unlearn: with --resume)") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``path``; if the block succeeds it replaces ``path``
    (an old ``path`` is removed just before the rename), else it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the directory the usual permissions
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_stale_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete the temp files and directories (:func:`atomic_path`'s and :func:`atomic_dir`'s
    ``.NAME.XXXX.tmp``) a killed writer left under ``root``; returns them. Run before resuming: what
    each one was meant to replace is intact."""
    stale = sorted(Path(root).rglob(".*.tmp"))
    stale = [p for p in stale if not any(q in p.parents for q in stale)]  # not inside another one
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
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
    """Read a JSON file (a damaged one is a :class:`UserError` naming it, see :mod:`sequnlearn.io`)."""
    from sequnlearn import io

    return io.read_json(path, "file")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file of objects; a missing file is an empty list."""
    from sequnlearn import io

    path = Path(path)
    return io.read_jsonl(path, "file") if path.exists() else []


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically with ``rows``."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def check_out_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check that ``out`` may be written; creates and changes nothing.

    Raises:
        UserError: ``out`` is a file, is non-empty without ``resume``/``overwrite``, or ``resume`` was
            asked for on a directory that holds no run.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    if resume:
        if not RunDir(out).is_run():
            raise UserError(f"--resume: {out} holds no run (no config.yaml); drop --resume to start a new run")
        return out
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --resume to continue it or --overwrite to replace it")
    return out


def claim_out_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Create ``out`` for the first file written into it; with ``overwrite``, empty it first."""
    out = Path(out)
    if overwrite and out.is_dir() and any(out.iterdir()):
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_out_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """:func:`check_out_dir`, then create ``out`` (emptied first with ``overwrite``)."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    return Path(out) if resume else claim_out_dir(out, overwrite=overwrite)


def _git(cwd: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def source_info() -> dict:
    """The running sequnlearn: version, and commit + dirty flag when it runs from a git checkout of
    sequnlearn itself (never those of a repository it is merely installed inside)."""
    import sequnlearn

    pkg = Path(sequnlearn.__file__).resolve().parent
    top = _git(pkg, "rev-parse", "--show-toplevel")
    ours = top is not None and (Path(top) / "src" / "sequnlearn").resolve() == pkg
    info = {"version": sequnlearn.__version__, "source": "git checkout" if ours else "installed", "path": str(pkg),
            "git_commit": None, "git_dirty": None}
    if ours:
        status = _git(pkg, "status", "--porcelain")
        info.update(git_commit=_git(pkg, "rev-parse", "HEAD"), git_dirty=bool(status) if status is not None else None)
    return info


def hardware() -> dict:
    """CPU model and cores, memory, and the GPUs torch sees."""
    import psutil
    import torch

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [{"name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": gpus}


def token_fingerprint(seqs: list[list[int]]) -> dict:
    """Number of documents and tokens, and a SHA-256 of the token ids (each document length-prefixed)."""
    import hashlib

    h = hashlib.sha256()
    for seq in seqs:
        h.update(len(seq).to_bytes(8, "little"))
        h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in seq))
    return {"documents": len(seqs), "tokens": sum(len(s) for s in seqs), "token_ids_sha256": h.hexdigest()}


def config_sha256(cfg) -> str:
    """SHA-256 of the resolved config as written to ``config.yaml``."""
    import hashlib

    from sequnlearn.config import dump_yaml

    return hashlib.sha256(dump_yaml(cfg).encode("utf-8")).hexdigest()


def run_fingerprints(cfg, batches) -> dict:
    """The resolved config's hash and the fingerprints of the tokenized forget/retain examples a run trains on."""
    return {"config_sha256": config_sha256(cfg),
            "data": {"forget": token_fingerprint(batches.forget), "retain": token_fingerprint(batches.retain)}}


def provenance(device: str | None = None) -> dict:
    """sequnlearn's version (and commit + dirty flag from its own checkout), package versions,
    hardware, device, host and start time."""
    from importlib.metadata import PackageNotFoundError, version

    pkgs = {}
    for name in ("sequnlearn", "torch", "transformers", "peft", "accelerate", "datasets", "lm-eval"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    source = source_info()
    pkgs["sequnlearn"] = source["version"]  # the code that runs, whatever dist-info is on the path
    return {
        "git_commit": source["git_commit"],
        "git_dirty": source["git_dirty"],
        "sequnlearn": source,
        "packages": pkgs,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hardware": hardware(),
        "device": device,
        "argv": sys.argv,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "end_time": None,
    }
