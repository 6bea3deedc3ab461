"""Benchmark the user's command beside PyTorch (the sections: cnnpipe/bench; `python scripts/bench.py --help`):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench.py --readme README.md   # make bench
    python scripts/bench.py --quick --out /tmp/bench                                          # a smoke run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnpipe.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
