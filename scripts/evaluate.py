"""Evaluate a checkpoint with the config it was trained with:

    python scripts/evaluate.py ckpt=outputs/train/<run>/checkpoints/best.npz [data.root=...] [out=eval.json]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.cli import fail, run_guarded


def main(argv):
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    stray = [a for a in argv if "=" not in a]
    if stray or "ckpt" not in args:
        fail(f"usage: python scripts/evaluate.py ckpt=<checkpoint.npz | run dir> [data.<key>=<value> ...] "
             f"[out=<file.json>]{'; not understood: ' + ' '.join(stray) if stray else ''}")
    from cnnpipe.evaluate import evaluate_checkpoint, format_report
    overrides = [f"{k}={v}" for k, v in args.items() if k not in ("ckpt", "out")]
    result = run_guarded(lambda: evaluate_checkpoint(args["ckpt"], overrides))
    print(format_report(result))
    if "out" in args:
        Path(args["out"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
