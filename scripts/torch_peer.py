"""The same network, data and optimizer in PyTorch, as a PyTorch user's loop  (cnnpipe/commands/torch_peer.py)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.commands.torch_peer import main  # noqa: E402

if __name__ == "__main__":
    main()
