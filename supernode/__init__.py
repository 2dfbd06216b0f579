"""The supernode: task registry, CDN seed, Redis piece map and scheduler."""

from common import __version__

__all__ = ["__version__"]
