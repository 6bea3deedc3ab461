"""Train a CNN with hand-written backprop:  python scripts/train.py pool=mean conv.k=5  (cnnpipe/commands/train.py)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.commands.train import main  # noqa: E402

if __name__ == "__main__":
    main()
