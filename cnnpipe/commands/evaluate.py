"""Evaluate a checkpoint with the config it was trained with:

    python scripts/evaluate.py ckpt=outputs/train/<run>/checkpoints/best.npz [data.root=...] [out=eval.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

from cnnpipe.cli import fail, run_guarded
from cnnpipe.evaluate import evaluate_checkpoint, format_report
from cnnpipe.jsonio import write_json_atomic


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    stray = [a for a in argv if "=" not in a]
    if stray or "ckpt" not in args:
        fail(f"usage: python scripts/evaluate.py ckpt=<checkpoint.npz | run dir> [data.<key>=<value> ...] "
             f"[out=<file.json>]{'; not understood: ' + ' '.join(stray) if stray else ''}")
    overrides = [f"{k}={v}" for k, v in args.items() if k not in ("ckpt", "out")]
    result = run_guarded(lambda: evaluate_checkpoint(args["ckpt"], overrides))
    print(format_report(result))
    if "out" in args:
        write_json_atomic(Path(args["out"]), result)
