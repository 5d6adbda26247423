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
    """Paths of one run directory (the unit of every result).

    ``root`` is where the files are written; ``final`` is where the run will live when it differs
    (an ``--overwrite`` builds the new run in a sibling staging directory, see :func:`replacing`)."""

    root: Path
    final: Path | None = None
    """The run's own path when ``root`` is a staging directory that replaces it once the run is done."""

    def claim(self) -> Path:
        """Create the directory just before its first file is written."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    @property
    def name(self) -> str:
        """The run's name: its final directory's name (not a staging directory's)."""
        return (self.final or self.root).name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def stored_config(self, *, raw: bool = False) -> dict:
        """The run's resolved config as read from ``config.yaml``, with the keys added to
        :class:`~sequnlearn.config.UnlearnConfig` after it was written at their defaults (what the run ran
        with; see :func:`~sequnlearn.config.with_defaults`); ``raw``: the file's mapping as it stands.

        Raises:
            UserError: ``config.yaml`` is missing, unreadable or not a mapping.
        """
        from sequnlearn import io
        from sequnlearn.config import with_defaults

        stored = io.read_yaml(self.config, "run config")
        return stored if raw else with_defaults(stored)

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


def model_label(path: str | os.PathLike) -> str:
    """The label ``sequnlearn tamper`` and ``audit`` give a model path: its directory's name (the run's, for
    a run's ``.../model``)."""
    p = Path(path)
    return p.parent.name if p.name == "model" else p.name


def respect_umask(path: Path) -> None:
    """Give ``path``, and everything under it when it is a directory, the mode a plain ``open`` or
    ``mkdir`` gives: 0666 (0777 for directories and executables) less the umask. Temp files and
    directories are created 0600/0700, and libraries that write through their own temp file
    (safetensors) leave weights 0600, unreadable to colleagues on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if p.is_symlink():
            continue
        wide = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if wide else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    respect_umask(Path(tmp))  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        respect_umask(Path(tmp))  # again: a writer may have put its own (0600) file there
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
    try:
        yield tmp
        respect_umask(tmp)  # mkdtemp makes 0700, safetensors writes its files 0600
        swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def swap_in(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``: an old ``path`` is renamed aside first and deleted only once
    ``new`` is in place, so at no moment is neither of them on disk."""
    if not path.exists():
        os.replace(new, path)
        return
    old = aside_path(path)
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old)


def aside_path(path: Path) -> Path:
    """Where :func:`swap_in` keeps the old ``path`` while the new one takes its place."""
    return path.with_name(f".{path.name}.old.tmp")


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


RUN_KINDS = {"unlearn": "run (no config.yaml of an unlearning run)", "tamper": "tamper result (no tamper.json)"}
"""The kinds of output directory ``--overwrite`` may replace, and how each is recognised."""


def is_kind(out: Path, kind: str) -> bool:
    """Whether ``out`` holds an output of ``kind`` (see :data:`RUN_KINDS`)."""
    if kind == "tamper":
        return (out / "tamper.json").is_file()
    if not (out / "config.yaml").is_file():
        return False
    try:
        return "remove_coef" in RunDir(out).stored_config(raw=True)
    except UserError:
        return False


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check that ``path`` can be created or written: no regular file above it, and its nearest
    existing directory writable. Creates nothing.

    Raises:
        UserError: a parent of ``path`` is a file, or the nearest existing directory is not writable.
    """
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a directory; choose another path")
            target = path if path.is_dir() else parent  # a file is replaced by a rename in its directory
            if not os.access(target, os.W_OK | os.X_OK):
                raise UserError(f"{what} {path}: {target} is not writable (permission denied); choose a "
                                "writable place or fix its permissions")
            return path
    return path


def _inputs_inside(out: Path, inputs) -> list[str]:
    """The local input paths that are ``out`` or lie under it."""
    root, found = out.resolve(), []
    for given in inputs:
        if given is None or str(given).startswith("tiny:"):
            continue
        p = Path(str(given)).expanduser()
        if p.exists() and (p.resolve() == root or root in p.resolve().parents):
            found.append(str(given))
    return found


def check_out_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, kind: str = "unlearn",
                  inputs=()) -> Path:
    """Check that ``out`` may be written; creates and changes nothing.

    ``--overwrite`` is a promise to replace an output of the same ``kind`` (:data:`RUN_KINDS`), never to
    delete what is not one: a directory of another kind, or one that holds or contains one of ``inputs``
    (model, corpora, MCQ files), is refused.

    Raises:
        UserError: ``out`` is a file or cannot be written, is non-empty without ``resume``/``overwrite``,
            ``resume`` was asked for on a directory that holds no run, ``overwrite`` on something that is
            not an output of ``kind`` or holds an input, or another command is writing it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    aside = aside_path(out)
    if aside.is_dir() and not out.exists():
        raise UserError(f"--out {out}: a replacement was killed as it swapped the runs, and the previous one is in "
                        f"{aside}; rename it back to {out} (or delete it), then run the command again")
    check_writable(out)
    check_unlocked(out)
    if resume:
        if not is_kind(out, kind):
            raise UserError(f"--resume: {out} holds no {RUN_KINDS[kind]}; drop --resume to start anew")
        return out
    held = _inputs_inside(out, inputs)
    if held and out.exists():
        raise UserError(f"--out {out} holds this command's input {held[0]}; write the result somewhere else")
    if is_replacement(out):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty; pass --resume to continue it or --overwrite to "
                            "replace it")
        if not is_kind(out, kind):
            raise UserError(f"--overwrite: {out} is no {RUN_KINDS[kind]}, so it was left as it is; choose another "
                            "--out, or move it away yourself")
    return out


def is_replacement(out: str | os.PathLike) -> bool:
    """Whether writing ``out`` replaces an earlier result (it is a non-empty directory)."""
    out = Path(out)
    return out.is_dir() and any(out.iterdir())


def staging_path(out: str | os.PathLike) -> Path:
    """Where a replacement of ``out`` is built (a hidden sibling, the same for every process)."""
    out = Path(out)
    return out.with_name(f".{out.name}.new.tmp")


@contextmanager
def replacing(out: str | os.PathLike, *, main: bool = True, what: str = "run") -> Iterator[Path]:
    """Build a replacement of the directory ``out`` in :func:`staging_path` and swap it in when the
    block succeeds; on any failure (Ctrl-C included) the staging directory is removed and ``out`` is as
    it was, which a :class:`UserError` then says (``what``: the kind of result, for the message).
    ``out``'s lock is held throughout. ``main``: this process writes (others only use the path)."""
    out = Path(out)
    stage = staging_path(out)
    with hold_lock(out, main=main):
        try:
            if main and stage.exists():
                shutil.rmtree(stage)  # left by a replacement that was killed: never a result
            yield stage
            if main:
                swap_in(stage, out)
        except UserError as e:
            raise UserError(f"{e} (the previous {what} in {out} is as it was)") from None
        finally:
            if main and stage.exists():
                shutil.rmtree(stage)


LOCK_NAME = ".sequnlearn.lock"
"""The lock file inside an output directory while a command writes it."""


def _locked_by_other(out: Path) -> UserError:
    return UserError(f"{out} is being written by another sequnlearn command ({out / LOCK_NAME} is locked); wait for "
                     "it to finish or choose another --out")


def _flock(fd: int, mode: int, out: Path) -> bool:
    """``flock`` ``fd``; False when another process holds the lock, True when taken or when the filesystem
    has no ``flock`` (some network filesystems: then said once, and nothing is locked)."""
    import fcntl

    try:
        fcntl.flock(fd, mode)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        from sequnlearn.errors import warn

        if str(out) not in _UNLOCKABLE:
            _UNLOCKABLE.add(str(out))
            warn(f"{out}: this filesystem cannot lock files ({e.strerror or e}); make sure no other sequnlearn "
                 "command writes the same directory")
        return True


_UNLOCKABLE: set[str] = set()
"""Directories whose filesystem has no ``flock`` (said once each)."""


def check_unlocked(out: str | os.PathLike) -> None:
    """Refuse when another process holds ``out``'s lock (creates nothing).

    Raises:
        UserError: another sequnlearn command is writing ``out``.
    """
    import fcntl

    out = Path(out)
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody writes it
    try:
        if not _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, out):
            raise _locked_by_other(out)
    finally:
        os.close(fd)


@contextmanager
def hold_lock(out: str | os.PathLike, *, main: bool = True, wait: bool = False) -> Iterator[None]:
    """Hold ``out``'s lock file (``out`` is created if need be) while the block writes; a second writer is
    refused, or with ``wait`` waits for the first.

    The lock is an ``flock``: it ends with the process, so a killed command leaves no stale lock; the
    lock file is removed when the block ends.

    Raises:
        UserError: another process holds it (without ``wait``).
    """
    import fcntl

    if not main:
        yield
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), out):
            os.close(fd)
            raise _locked_by_other(out)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed the file as we opened it: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def prepare_out_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                    kind: str = "unlearn") -> Path:
    """:func:`check_out_dir`, then create ``out`` (an old output of ``kind`` emptied first with ``overwrite``).

    For the demo's own sub-directories and tests; commands replace a run with :func:`replacing`, which
    keeps the old one until the new one is done."""
    check_out_dir(out, resume=resume, overwrite=overwrite, kind=kind)
    out = Path(out)
    if not resume and overwrite and is_replacement(out):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
    """The resolved config's hash, the fingerprints of the tokenized forget/retain examples a run trains
    on, and what loading them dropped or cut (``corpora``: rows skipped, documents truncated and used)."""
    return {"config_sha256": config_sha256(cfg),
            "data": {"forget": token_fingerprint(batches.forget), "retain": token_fingerprint(batches.retain)},
            "corpora": dict(getattr(batches, "counts", None) or {})}


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
