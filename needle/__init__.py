"""The `needle` command: the one place that imports both app/ and workers/."""

__version__ = "0.1.0"
