"""Evaluate a checkpoint: python scripts/evaluate.py ckpt=<run>/checkpoints/best.npz  (cnnpipe/commands/evaluate.py)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
