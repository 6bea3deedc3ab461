import sys

from cnnpipe.bench.cli import main

sys.exit(main())
