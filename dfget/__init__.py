"""dfget: the download CLI and the per-host peer server of dragonfly-py."""

from common import __version__

__all__ = ["__version__"]
