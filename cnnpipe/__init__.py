"""cnnpipe: a config-driven CNN trainer whose backpropagation is written by hand."""
__version__ = "0.1.0"


class ConfigError(ValueError):
    """A user-facing error: a bad value, an impossible architecture, a missing file.

    Entry points print its message as one paragraph and exit non-zero, without a traceback.
    """
