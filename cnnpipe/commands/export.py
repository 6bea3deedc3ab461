"""Export a checkpoint for PyTorch or ONNX, kept only if it reproduces our logits (cnnpipe/export.py):

    python scripts/export.py ckpt=<checkpoint.npz | run dir> format=torch|onnx [out=<file>]   (or cnnpipe-export ...)
Exits 1 when the export does not match (nothing is written), 2 on bad input.
"""
from __future__ import annotations

import sys

from cnnpipe.cli import fail, run_guarded
from cnnpipe.export import TOLERANCE, ExportCheckError, export_checkpoint, format_report, parse_args


def main(argv: list[str] | None = None) -> None:
    """cnnpipe-export ckpt=<file> format=torch|onnx [out=<file>] [data.*=...] [backend.*=...]"""
    argv = sys.argv[1:] if argv is None else argv
    ckpt, fmt, out, overrides = run_guarded(lambda: parse_args(argv))
    try:
        result = run_guarded(lambda: export_checkpoint(ckpt, fmt, out, overrides))
    except ExportCheckError as e:
        fail(f"{e} Nothing was written: the export is kept only when it matches (relative error <= "
             f"{TOLERANCE:.0e}). Report this with the checkpoint and the command.", code=1)
    print(format_report(result))
