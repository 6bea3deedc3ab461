"""Files of a run (metrics.json, job.json, summaries, exports): written atomically; JSON read forgivingly."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: Path, before_rename: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A temporary name in path's folder to write to; on a clean exit it is fsynced and renamed to path, and the
    rename made durable (a reader, or a machine that lost power, sees the old file or the new one, never half); on
    an error removed. `before_rename(tmp)`: a fault-injection point for tests."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)                     # the rename itself
        finally:
            os.close(dirfd)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj: Any, indent: int = 2) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=_jsonable)


def read_json(path: Path) -> dict | None:
    """The file's object, or None when it is missing or unreadable (a job that never wrote it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)                       # paths, config nodes: their text
