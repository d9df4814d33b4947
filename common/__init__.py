"""The bottom layer every other package may import: the error root, the version, and the
small file and JSON helpers. It imports nothing from the rest of focaltrack."""

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.version import __version__

__all__ = ["FocaltrackError", "__version__"]
