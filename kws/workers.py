"""Worker processes of ``kws serve``: every POST /detect joins one queue and runs in whichever is free.

uvicorn's own workers would each keep the connections the kernel happened to hand them:
16 keep-alive clients split 14 to 2 leave one core idle while the other's clients queue
(bench/load.py on 2 cores: p99 80 ms, against 47 ms when they split 8 to 8). One queue in
front of the processes keeps every core busy while any request waits, however the
clients connect. Processes rather than threads, because most of a request's work holds
the GIL.

Each process talks to the server's event loop over its own socket pair, so handing a request
on takes no thread in the HTTP process. concurrent.futures' process pool took two (its
manager and queue feeder): against it, this pool cut the HTTP process's CPU per request
from 0.83 to 0.52 ms and served 1.16 times the requests (bench/load.py's load, 2 cores).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import socket
import struct
import traceback
from pathlib import Path

from kws import STOP_SIGNALS, audio
from kws.runtime import Model, quiet_stderr
from kws.stream import Detector, detection_config, recording_report

log = logging.getLogger("uvicorn.error")
START_TIMEOUT_S = 60.0
RESTART_DELAY_S = 5.0  # between attempts to start a process in place of one that died
STOP_TIMEOUT_S = 10.0  # for a process to finish its requests once the server closes
# A process scans audio 100 times faster than it lasts or more (a minute of 192 kHz stereo FLAC
# takes 0.55 s): one that has not answered within the duration limit, twice over (it may hold a
# request ahead of this one), plus this much, is stuck, and is killed.
STUCK_AFTER_S = 30.0
LENGTH = struct.Struct("!Q")  # each message: its length, then its pickle
# A process holds the request it works on and the next, so it never waits for the HTTP process
# to hand that one on: one at a time served 7 % fewer requests (bench/load.py, 2 cores).
REQUESTS_PER_WORKER = 2
# Requests that may wait for a process, per process; beyond them a request gets 503 busy. A
# request costs up to ~0.6 s of a process (a minute of 192 kHz stereo): the last to wait is
# answered within ~10 s, where an unbounded queue of small, cheap-to-send uploads kept a 1 s
# clip waiting 26 s.
WAITING_PER_WORKER = 16
READY = "ready"  # a worker's first message, once its model is loaded
NO_WORKER = "no worker process is running and none could be started: try again later"
SHUTTING_DOWN = "the server is shutting down: try again"
# How a 413 ends, for the body's size and the audio's length alike.
TOO_LONG_ADVICE = (
    "send it in shorter parts, or run kws detect on it (kws serve --max-bytes and --max-seconds set "
    "the limits)"
)


CGROUP = Path("/sys/fs/cgroup")


def default_workers(cgroup: Path = CGROUP) -> int:
    """One worker process per core this process may run on, and no more than its CPU quota allows.

    A container started with ``--cpus 2`` on a 64-core host sees 64 cores; 64 workers there
    would each load a model and take turns on two cores' worth of time.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return min(cores, max(1, math.ceil(quota))) if quota else cores


def _cpu_quota(cgroup: Path) -> float | None:
    """Cores' worth of CPU time the container may use, if it is limited (cgroup v2, else v1)."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup / "cpu.max").read_text().split()  # "max 100000" when unlimited
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # -1 when unlimited
        return None if quota < 0 else quota / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    return None


class RequestError(Exception):
    """A recording the Detector cannot answer for: the HTTP status to give and why."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def detect(
    model: Model,
    data: bytes,
    name: str,
    max_seconds: float,
    threshold: float | dict[str, float] | None,
    top_k: int | None,
) -> dict:
    """Decode and detect one uploaded recording, 10 s at a time as ``kws detect`` reads a file:
    its report, or RequestError (413 or 415)."""
    detector = Detector(model, detection_config(model.manifest, threshold))
    try:
        # A damaged MP3 has libmpg123 print a line per bad frame, naming no request: a client
        # could fill the server's log with them. The error that counts is raised, not printed.
        with quiet_stderr():
            return recording_report(detector, audio.decoded_blocks(data, name, max_seconds), name, top_k)
    except audio.TooLong as error:
        raise RequestError(413, f"{error}: {TOO_LONG_ADVICE}") from None
    except audio.AudioError as error:
        raise RequestError(415, str(error)) from None


class WorkerDied(Exception):
    """A worker process went away (killed, out of memory, a crash in native code).

    ``running``: the request it was working on, rather than one waiting behind it.
    """

    def __init__(self, running: bool = False):
        super().__init__(running)
        self.running = running


class WorkerFailed(Exception):
    """detect() raised something other than RequestError in a worker: a defect, answered 500."""


def _serve(connection: socket.socket, content: bytes, manifest: dict, source: str) -> None:
    """A worker process: load the model, say it is ready, then answer requests until the socket closes."""
    # Ctrl-C, a SIGTERM to the whole process group (systemd's default) and a closed terminal's
    # SIGHUP reach the workers too: they finish their requests while the server shuts them down.
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    model = Model(content, manifest, source=source)
    with connection, connection.makefile("rb") as incoming:
        _send(connection, READY)
        while len(header := incoming.read(LENGTH.size)) == LENGTH.size:
            (size,) = LENGTH.unpack(header)
            if len(request := incoming.read(size)) < size:  # the server died sending it
                return
            arguments = pickle.loads(request)
            try:
                answer = detect(model, *arguments)
            except RequestError as error:
                answer = error
            except Exception:
                answer = WorkerFailed(traceback.format_exc())
            try:
                _send(connection, answer)
            except OSError:  # the server is gone
                return


def _send(connection: socket.socket, value) -> None:
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    connection.sendall(LENGTH.pack(len(data)) + data)


class _Worker:
    """The server's end of one worker process: requests go out in order, answers come back in order."""

    def __init__(self, process, kill_at_exit, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.process, self.reader, self.writer = process, reader, writer
        self._kill_at_exit = kill_at_exit
        self.stuck = False  # killed for not answering in time
        self.busy = 0  # requests given to it and not answered yet
        self._answers: collections.deque[asyncio.Future] = collections.deque()
        self._reading: asyncio.Task | None = None

    @classmethod
    async def start(cls, context, model: Model) -> _Worker:
        """A new process running ``model``; RuntimeError when it does not come up."""
        ours, theirs = socket.socketpair()
        arguments = (theirs, model.content, model.manifest, model.source)
        process = context.Process(target=_serve, args=arguments, daemon=True, name="kws-worker")
        process.start()
        theirs.close()
        # The processes ignore SIGTERM, which is what multiprocessing ends its children with
        # when the server exits without closing the pool (a crash): kill them first instead.
        kill_at_exit = multiprocessing.util.Finalize(process, process.kill, exitpriority=0)
        worker = cls(process, kill_at_exit, *await asyncio.open_connection(sock=ours))
        try:
            await asyncio.wait_for(worker._receive(), START_TIMEOUT_S)
        except BaseException as error:  # also cancelled, by a server closing while it starts
            worker.stop()
            if isinstance(error, WorkerDied):
                process.join(1.0)  # it is exiting: its own exit code, not the kill's
            process.kill()
            worker.reap()
            if isinstance(error, WorkerDied):
                raise RuntimeError(
                    f"a worker process exited while loading its model (exit code {process.exitcode}): "
                    "its error is above"
                ) from None
            if isinstance(error, asyncio.TimeoutError):
                raise RuntimeError(
                    f"a worker process did not load its model within {START_TIMEOUT_S:.0f} s"
                ) from None
            raise
        worker._reading = asyncio.ensure_future(worker._read_answers())
        return worker

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def answering(self) -> bool:
        """False once its socket has closed, which may be well before its process has ended."""
        return self._reading is not None and not self._reading.done()

    def send(self, payload: bytes) -> asyncio.Future:
        """Send one request's pickled arguments; the future of its answer (a report or an
        exception), or of WorkerDied."""
        answer = asyncio.get_running_loop().create_future()
        if not self.answering:
            answer.set_exception(WorkerDied())
            return answer
        self._answers.append(answer)
        self.writer.writelines([LENGTH.pack(len(payload)), payload])
        return answer

    async def _read_answers(self) -> None:
        try:
            while True:
                answer = await self._receive()
                self._answers.popleft().set_result(answer)
        except WorkerDied:
            running = True
            while self._answers:
                self._answers.popleft().set_exception(WorkerDied(running))
                running = False

    async def _receive(self):
        try:
            (length,) = LENGTH.unpack(await self.reader.readexactly(LENGTH.size))
            return pickle.loads(await self.reader.readexactly(length))
        except (OSError, asyncio.IncompleteReadError):
            raise WorkerDied from None

    def kill_stuck(self) -> None:
        self.stuck = True
        self.process.kill()

    def stop(self) -> None:
        """Close the socket: the process ends, answering nothing more."""
        self.writer.close()

    def finish(self) -> None:
        """Send no more requests: the process answers those it was given, then ends."""
        self.writer.write_eof()

    def reap(self) -> None:
        """Wait for the ended process, then drop its exit hook, which would hold it (and the two
        pipes of its Popen) for as long as the server runs."""
        self.process.join()
        self._kill_at_exit.cancel()

    def stop_reading(self) -> None:
        if self._reading is not None:
            self._reading.cancel()


class WorkerPool:
    """``size`` processes, each with its own copy of ``model``, taking detections from one queue.

    Each process holds up to REQUESTS_PER_WORKER requests, so that it starts on the next
    the moment it answers one, without waiting for the HTTP process to hand it on; a request
    goes to the process with the fewest. A process that dies is replaced at once. While none
    runs and the last attempt to start one failed (``failing``), requests get 503 at once
    and /ready says 503; attempts go on every RESTART_DELAY_S.
    """

    def __init__(self, model: Model, size: int):
        # The model itself, not its path: a process started in place of a dead one runs what the
        # others run (and /model describes), even if the file was exported again since.
        self.model, self.size = model, size
        # spawn, not fork: a forked child would inherit the server's event loop and sockets.
        self._context = multiprocessing.get_context("spawn")
        self._workers: set[_Worker] = set()  # the processes running
        self._waiting: collections.deque[asyncio.Future] = collections.deque()  # requests, in order
        self._restarts: set[asyncio.Task] = set()
        self._start_failed = False
        self._closed = False

    @property
    def failing(self) -> bool:
        """No process runs and the last attempt to start one failed."""
        return not self._workers and self._start_failed

    async def start(self) -> set[int]:
        """Start every process and load its model; their pids."""
        started = await asyncio.gather(
            *(_Worker.start(self._context, self.model) for _ in range(self.size)), return_exceptions=True
        )
        for worker in started:
            if not isinstance(worker, BaseException):
                self._add(worker)
        failed = [error for error in started if isinstance(error, BaseException)]
        if failed:
            await self.close()
            raise failed[0]
        return {worker.pid for worker in self._workers}

    async def detect(
        self,
        data: bytes,
        name: str,
        max_seconds: float,
        threshold: float | dict[str, float] | None,
        top_k: int | None,
    ) -> dict:
        """``detect(model, ...)`` in a worker process. A request that waited behind one whose
        process died goes to another; the one the process died on gets 503."""
        for _ in range(2):
            worker = await self._free()
            # Pickled once a process takes it: a waiting request holds its bytes once, not twice.
            answer = worker.send(
                pickle.dumps((data, name, max_seconds, threshold, top_k), pickle.HIGHEST_PROTOCOL)
            )
            # A timer rather than wait_for, which makes a task per request. Killing the process
            # fails its requests with WorkerDied. The answer stops the timer, not this coroutine:
            # a request whose client gave up is still the process's, which may be stuck on it.
            overdue = asyncio.get_running_loop().call_later(
                STUCK_AFTER_S + 2 * max_seconds, worker.kill_stuck
            )
            answer.add_done_callback(functools.partial(self._answered, worker, overdue))
            try:
                # A request whose client goes away is cancelled, but its worker still answers
                # it: only then is it free again, and the next answer is the next request's.
                result = await asyncio.shield(answer)
            except WorkerDied as died:
                if died.running:  # it may be what killed the process: not given a second one
                    cause = "got stuck on" if worker.stuck else "died running"
                    raise RequestError(503, f"the worker process {cause} this request: try again") from None
                continue
            if isinstance(result, Exception):
                # Raised afresh: the answer itself would keep, in its traceback, this frame, which
                # holds it and the request's bytes, a cycle only the garbage collector frees.
                raise type(result)(*result.args)
            return result
        raise RequestError(503, "a worker process died twice in a row: try again")

    async def _free(self) -> _Worker:
        """The process to give a request to, in the order the requests came."""
        if self._closed:
            raise RequestError(503, SHUTTING_DOWN)
        if self.failing:
            raise RequestError(503, NO_WORKER)
        if not self._waiting:
            worker = self._least_busy()
            if worker is not None:
                worker.busy += 1
                return worker
        waiting = sum(not waiter.done() for waiter in self._waiting)  # done: given up by their clients
        if waiting >= WAITING_PER_WORKER * self.size:
            raise RequestError(
                503,
                f"busy: {waiting} requests wait for the {self.size} worker process{'es' * (self.size != 1)}; "
                "try again",
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            worker = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                waiter.result().busy -= 1  # handed a process, but cancelled before using it
                self._hand_on()
            raise
        if worker is None:
            raise RequestError(503, SHUTTING_DOWN if self._closed else NO_WORKER)
        return worker

    def _refuse_waiting(self) -> None:
        """Hand every waiting request None: no process will take it (503)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _least_busy(self) -> _Worker | None:
        free = [worker for worker in self._workers if worker.busy < REQUESTS_PER_WORKER and worker.answering]
        return min(free, key=lambda worker: worker.busy, default=None)

    def _hand_on(self) -> None:
        """Give the requests waiting the processes that can take them."""
        while self._waiting:
            worker = self._least_busy()
            if worker is None:
                return
            waiter = self._waiting.popleft()
            if not waiter.done():  # else its request was cancelled
                worker.busy += 1
                waiter.set_result(worker)

    def _answered(self, worker: _Worker, overdue: asyncio.TimerHandle, answer: asyncio.Future) -> None:
        overdue.cancel()
        worker.busy -= 1
        broke = not answer.cancelled() and answer.exception() is not None and not self._closed
        if broke and worker.process.is_alive():
            worker.process.kill()  # its socket failed: end it, and _died replaces it
        self._hand_on()

    def _add(self, worker: _Worker) -> None:
        self._workers.add(worker)
        # The process's sentinel becomes readable when it ends, busy or idle.
        asyncio.get_running_loop().add_reader(worker.process.sentinel, self._died, worker)
        self._hand_on()

    def _died(self, worker: _Worker) -> None:
        asyncio.get_running_loop().remove_reader(worker.process.sentinel)
        self._workers.discard(worker)
        worker.stop()
        worker.reap()
        if self._closed:
            return
        code = worker.process.exitcode
        log.error("worker process %d died (exit code %s): starting another", worker.pid, code)
        restart = asyncio.ensure_future(self._restart())
        self._restarts.add(restart)
        restart.add_done_callback(self._restarts.discard)

    async def _restart(self) -> None:
        while True:
            try:
                worker = await _Worker.start(self._context, self.model)
            except Exception as error:  # also OSError: out of file descriptors, or memory to spawn
                self._start_failed = True
                if self.failing:  # tell the requests waiting for a process
                    self._refuse_waiting()
                log.error("%s; trying again in %.0f s", error, RESTART_DELAY_S)
                await asyncio.sleep(RESTART_DELAY_S)
            else:
                self._start_failed = False
                self._add(worker)
                return

    async def close(self) -> None:
        """Stop restarting, refuse the requests still waiting, and end every process once it has
        answered what it was given."""
        self._closed = True
        for restart in self._restarts:
            restart.cancel()
        self._refuse_waiting()
        workers, self._workers = list(self._workers), set()
        for worker in workers:
            asyncio.get_running_loop().remove_reader(worker.process.sentinel)
            worker.finish()
        await asyncio.to_thread(_join, [worker.process for worker in workers])
        for worker in workers:
            worker.stop_reading()
            worker.stop()
            worker.reap()


def _join(processes) -> None:
    for process in processes:
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
