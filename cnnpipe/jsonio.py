"""JSON files of a run (metrics.json, job.json, summaries): written atomically, read forgivingly."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_json_atomic(path: Path, obj: Any) -> None:
    """Temporary file in the same folder, fsync, rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
