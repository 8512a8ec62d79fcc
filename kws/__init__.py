"""kws: keyword spotting from training to phones, microcontrollers, microphones and HTTP."""

__version__ = "0.1.0"
