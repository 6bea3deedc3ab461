"""Check the hand-written gradients against finite differences  (cnnpipe/commands/gradcheck.py)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.commands.gradcheck import main  # noqa: E402

if __name__ == "__main__":
    main()
