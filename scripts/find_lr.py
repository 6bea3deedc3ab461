"""The LR range test: python scripts/find_lr.py optim=adam  (cnnpipe/commands/find_lr.py)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.commands.find_lr import main  # noqa: E402

if __name__ == "__main__":
    main()
