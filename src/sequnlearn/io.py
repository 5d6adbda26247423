"""Every input file is read here: MCQ files, corpora, configs, run files, checkpoints, weights.

A missing or unreadable file, undecodable bytes, truncated JSON, a value of the wrong type or a
damaged checkpoint becomes one :class:`UserError` that names the file (and the line) and the fix,
so the CLI answers every bad file with one line and exit code 2, before it writes anything.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from sequnlearn.errors import UserError

PathLike = str | os.PathLike


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_file(path: PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); looked at with ``stat``, never opened, so a
    FIFO (whose opening blocks until a writer comes) or a device (``/dev/zero`` never ends) is refused
    before anything reads it.

    Raises:
        UserError: it does not exist, is a directory, a FIFO, a device or a socket, or cannot be looked at.
    """
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist; check the path") from None
    except OSError as e:
        raise UserError(f"{what} {p} cannot be read ({e.strerror or e}); check the path") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {p} is a directory; give the path of a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
        raise UserError(f"{what} {p} is {kind}, not a regular file; save the data to a file and give its path")
    return p


def read_bytes(path: PathLike, what: str = "file", *, size: int = -1) -> bytes:
    """The bytes of ``path`` (the first ``size`` of them when ``size`` >= 0), once :func:`check_file`
    has found it a regular file.

    Raises:
        UserError: it does not exist, is a directory, a FIFO, a device or a socket, or cannot be read.
    """
    p = check_file(path, what)
    try:
        with open(p, "rb") as f:
            return f.read(size)
    except OSError as e:  # gone or changed since check_file looked, or not readable
        if isinstance(e, (FileNotFoundError, IsADirectoryError)):
            check_file(p, what)
        raise UserError(f"{what} {p} cannot be read ({e.strerror or e}); check its permissions") from None


def decode(data: bytes, path: PathLike, what: str = "file") -> str:
    """``data`` as UTF-8 text (a UTF-8 byte-order mark is dropped).

    Raises:
        UserError: the bytes are not UTF-8; names the line and offset of the first bad byte.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{what} {path} is not UTF-8 text{hint}: byte 0x{data[e.start]:02x} at line {line} "
                        f"(offset {e.start}); save it as UTF-8, e.g. iconv -f utf-16 -t utf-8") from None


def read_text(path: PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (see :func:`read_bytes`, :func:`decode`)."""
    return decode(read_bytes(path, what), path, what)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value),
                                                                                       type(value).__name__)


def expect(value: Any, kind: type, where: str, fix: str) -> Any:
    """``value`` if it is a ``kind``, else a :class:`UserError` naming ``where`` and ``fix``."""
    if not isinstance(value, kind):
        want = {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__)
        raise UserError(f"{where} is {_type_name(value)}, not {want}; {fix}")
    return value


def read_json(path: PathLike, what: str = "file", kind: type | None = None) -> Any:
    """Parse a JSON file (optionally checking that its top level is a ``kind``).

    Raises:
        UserError: unreadable, not UTF-8, not valid JSON (line and column named), or the wrong type.
    """
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (the file looks cut short)" if e.pos >= len(text.rstrip()) else ""
        raise UserError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}; "
                        "fix or regenerate the file") from None
    if kind is not None:
        expect(data, kind, f"{what} {path}", "fix or regenerate the file")
    return data


def read_jsonl(path: PathLike, what: str = "file", kind: type | None = dict) -> list[Any]:
    """Parse a JSON-lines file: one value per non-blank line, each a ``kind`` (default: an object).

    Raises:
        UserError: unreadable, not UTF-8, a line that is not JSON (a truncated one included) or of
            the wrong type; the message names the line.
    """
    return [row for _, row in read_jsonl_numbered(path, what, kind)]


def read_jsonl_numbered(path: PathLike, what: str = "file", kind: type | None = dict) -> list[tuple[int, Any]]:
    """:func:`read_jsonl` with each value's line number (1-based; blank lines are skipped but counted).

    Raises:
        UserError: as :func:`read_jsonl`.
    """
    rows = []
    for i, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} {path} line {i} is not valid JSON ({e.msg}, column {e.colno}); "
                            "fix that line: one JSON object per line") from None
        if kind is not None:
            expect(row, kind, f"{what} {path} line {i}", "write one JSON object per line")
        rows.append((i, row))
    return rows


class _DuplicateKey(Exception):
    """A mapping of a YAML file gives ``key`` twice, at 1-based ``lines``."""

    def __init__(self, key: Any, lines: tuple[int, int]):
        super().__init__(key, lines)
        self.key, self.lines = key, lines


@functools.lru_cache(maxsize=None)
def _unique_key_loader():
    """A ``yaml.SafeLoader`` that raises :class:`_DuplicateKey` where a mapping repeats a key (merge
    keys ``<<`` may still be overridden, as YAML defines)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(key, (seen[key], line))
                        seen[key] = line
                    except TypeError:  # an unhashable key: the safe loader refuses it itself
                        pass
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_yaml(path: PathLike, what: str = "config file") -> dict:
    """Read a YAML mapping (an empty file is ``{}``).

    Raises:
        UserError: unreadable, not UTF-8, a syntax error (line and column named), a key given twice in
            one mapping (key and lines named), or not a mapping.
    """
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        first, again = e.lines
        raise UserError(f"{what} {path} gives the key {e.key!r} twice (lines {first} and {again}); "
                        "keep one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"YAML syntax error in {path}{where}: {getattr(e, 'problem', None) or e}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of key: value (got {type(data).__name__}); fix the file")
    return data


def read_parquet(path: PathLike, what: str = "file") -> list[dict]:
    """Rows of a parquet file as dicts.

    Raises:
        UserError: missing, unreadable, or not a parquet file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    read_bytes(path, what, size=0)  # the usual answer for a missing file or a directory
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is not a readable parquet file ({reason}); fix or regenerate it") from None


def load_torch(path: PathLike, what: str = "checkpoint", keys: tuple[str, ...] = ()) -> Any:
    """``torch.load`` of a file we wrote (on the CPU), checking that a dict with ``keys`` came back.

    Raises:
        UserError: missing, truncated or corrupted, or not the expected content.
    """
    import torch

    read_bytes(path, what, size=0)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors all mean "damaged"
        raise UserError(f"{what} {path} is truncated or corrupted ({type(e).__name__}); delete it to start the run "
                        "over, or restore it from a copy") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{what} {path} lacks {', '.join(missing)}; it was not written by this tool, delete it")
    return state


def check_safetensors(path: PathLike) -> None:
    """Check that a ``.safetensors`` file is whole: its header parses and its data is all there.

    Raises:
        UserError: missing, not a regular file, truncated, or a damaged header.
    """
    p = check_file(path, "weight file")
    fix = "download or save the model again"
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (None,)
            header = f.read(n) if n is not None and 8 + n <= size else None
    except OSError as e:
        raise UserError(f"weight file {p} cannot be read ({e.strerror or e}); {fix}") from None
    try:
        meta = json.loads(header.decode("utf-8")) if header is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"weight file {p} is corrupted (its header does not parse); {fix}")
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"weight file {p} is truncated ({size} of {8 + n + end} bytes); {fix}")
