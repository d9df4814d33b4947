"""The one root of focaltrack's own exceptions.

Every error a user can act on (a bad file, a bad configuration, a stage that times out, a
model for another pixel size) derives from :class:`FocaltrackError`; the CLI prints its
message as one line and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class FocaltrackError(Exception):
    """An error a user can act on; its message is one line naming the problem."""
