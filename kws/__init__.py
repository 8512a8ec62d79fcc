"""kws: keyword spotting from training to phones, microcontrollers, microphones and HTTP."""

__version__ = "0.1.0"


class KwsError(Exception):
    """A problem the user can act on: its message says what was wrong and what to do.

    Every command prints it as one line, without a traceback, and exits with status 2.
    """
