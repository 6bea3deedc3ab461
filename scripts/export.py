"""Export a checkpoint for PyTorch or ONNX, checked against our logits on a test batch:

    python scripts/export.py ckpt=outputs/train/<run>/checkpoints/best.npz format=torch|onnx [out=<file>]
(cnnpipe/commands/export.py)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.commands.export import main  # noqa: E402

if __name__ == "__main__":
    main()
