"""The service and the command-line interface."""

from focaltrack.common.version import __version__

__all__ = ["__version__"]
