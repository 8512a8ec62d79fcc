"""Worker processes of ``kws serve``: every POST /detect joins one queue and runs in whichever is free.

uvicorn's own workers would each keep the connections the kernel happened to hand them:
16 keep-alive clients split 14 to 2 leave one core idle while the other's clients queue
(bench/load.py on 2 cores: p99 80 ms, against 47 ms when they split 8 to 8). One queue in
front of the processes keeps every core busy while any request waits, however the
clients connect. Processes rather than threads, because most of a request's work holds
the GIL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from kws import audio
from kws.runtime import Model
from kws.stream import Detector, detection_config, recording_report

_model: Model | None = None  # a worker process's own model, loaded as the process starts
START_TIMEOUT_S = 60.0


class RequestError(Exception):
    """A recording the Detector cannot answer for: the HTTP status to give and why."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def detect(
    model: Model, data: bytes, name: str, max_seconds: float, threshold: float | None, top_k: int | None
) -> dict:
    """Decode and detect one uploaded recording: its report, or RequestError (413 or 415)."""
    try:
        samples = audio.decode(data, name, max_seconds)
    except audio.TooLong as error:
        raise RequestError(413, str(error)) from None
    except audio.AudioError as error:
        raise RequestError(415, str(error)) from None
    if top_k is not None:
        top_k = min(top_k, len(model.labels))  # numpy cannot slice with a 30-digit number
    detector = Detector(model, detection_config(model.manifest, threshold))
    return recording_report(detector, [samples], name, top_k)


def _load(path: str | None) -> None:
    global _model
    # Ctrl-C, and a SIGTERM to the whole process group (systemd's default), reach the workers
    # too: they finish their requests while the server shuts them down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _model = Model.load(path)


def _detect_here(*args) -> dict:
    return detect(_model, *args)


def _started() -> int:
    """Busy a started process a moment, so that the others get the next warm-up tasks."""
    time.sleep(0.05)
    return os.getpid()


class WorkerPool:
    """``size`` processes, each with its own model, taking detections from one queue."""

    def __init__(self, model: str | None, size: int):
        self.model, self.size = model, size
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: a forked child would inherit the server's event loop and sockets.
        return ProcessPoolExecutor(
            self.size,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load,
            initargs=(self.model,),
        )

    def warm_up(self) -> set[int]:
        """Start every process and load its model (the pool starts them on demand); their pids."""
        pids: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(pids) < self.size and time.monotonic() < deadline:
            tasks = [self._executor.submit(_started) for _ in range(self.size)]
            pids |= {task.result() for task in tasks}
        return pids

    async def detect(self, *args) -> dict:
        """``detect(model, *args)`` in a free process; a pool whose process died is replaced.

        A process dies when something kills it (out of memory, a signal, a crash in native
        code): the request is tried once more on the new pool before it gets 503.
        """
        for _ in range(2):
            executor = self._executor
            try:
                return await asyncio.wrap_future(executor.submit(_detect_here, *args))
            except BrokenProcessPool:
                if executor is self._executor:  # the first request to find it broken replaces it
                    self._executor = self._start()
                    executor.shutdown(wait=False)
        raise RequestError(503, "a worker process died twice in a row: try again")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
