"""kws: keyword spotting from training to phones, microcontrollers, microphones and HTTP."""

import contextlib
import signal
import threading

__version__ = "0.1.0"
# Besides Ctrl-C (SIGINT), what stops a command: docker stop, systemd and timeout's SIGTERM, a
# closed terminal's SIGHUP.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class KwsError(Exception):
    """A problem the user can act on: its message says what was wrong and what to do.

    Every command prints it as one line, without a traceback, and exits with status 2.
    """


class Stopped(KeyboardInterrupt):
    """A signal that stops a command as Ctrl-C does: what it writes is cleaned up or kept whole,
    and it says how it ended (listen prints its summary, train how to resume)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def stopped_by_signals():
    """STOP_SIGNALS raise Stopped in the main thread instead of killing the process mid-write. A
    signal set aside before (nohup's SIGHUP) is left as it was; each handler is given back at
    the end. Elsewhere than the main thread, which alone can set handlers, nothing changes."""

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is signal.SIG_DFL]
    for signum in taken:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in taken:
            signal.signal(signum, signal.SIG_DFL)
