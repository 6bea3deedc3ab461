"""What every entry point shares: user errors become one paragraph on stderr and a non-zero exit."""
from __future__ import annotations

import sys
import textwrap

from cnnpipe import ConfigError

EXIT_CONFIG = 2


def fail(message: str, code: int = EXIT_CONFIG):
    print("\n".join(textwrap.wrap(f"error: {message}", width=110, break_on_hyphens=False,
                                   break_long_words=False)), file=sys.stderr)
    sys.exit(code)


def run_guarded(fn):
    """Call fn(); a ConfigError exits with its message (no traceback)."""
    try:
        return fn()
    except ConfigError as e:
        fail(str(e))
