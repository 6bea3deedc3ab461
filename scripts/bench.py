"""Benchmark the user's command beside PyTorch  (cnnpipe/bench; python scripts/bench.py --help)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
