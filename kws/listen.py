"""`kws listen`: keywords spotted live in a microphone's audio, or in a file played like a microphone."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import queue
import select
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kws import Stopped, audio
from kws.audio import MIN_SAMPLE_RATE, AudioError
from kws.stream import Detector, Event, RateDetector, detections_text, keywords

BLOCK_SECONDS = 0.05  # audio handed over per callback
STALL_SECONDS = 5.0  # a microphone that delivers nothing for this long has died
READER_CHECK_SECONDS = 0.5  # how soon the reader's exit is seen while the input sends nothing
PIPE_STOP_SECONDS = 0.2  # for a pipe's thread to end when stopped, after which it is left behind
ABORT_SECONDS = 2.0  # for a failed input's abort, after which it is left to end with the process
# Blocks waiting for the Detector at most (10 s of audio). A file played --fast waits for the
# Detector rather than pile up in memory; a microphone's audio thread would only wait once the
# Detector has fallen 10 s behind, when audio is lost either way.
QUEUE_BLOCKS = round(10 / BLOCK_SECONDS)
METER_SECONDS = 0.1  # the level meter is redrawn at most this often
METER_FLOOR_DB = -60.0  # an empty bar
METER_WIDTH = 30


class ListenError(AudioError):
    """An audio input that cannot be opened or stops delivering; the message says what exists."""


# How a listen ended when the program reading its output exited (`kws listen --json | program`).
READER_GONE = "its reader's exit"


class _ReaderWatch:
    """Whether the program reading ``out``, a pipe or a Unix socket (Node.js gives its children
    socket pairs; a TCP peer's leaving shows only at the next write), has exited: found at once,
    rather than at the next event, which could be hours away in a quiet room and would be lost."""

    def __init__(self, out):
        self._poll = None
        try:
            mode = os.fstat(out.fileno()).st_mode
        except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO)
            return
        if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and hasattr(select, "poll"):  # Windows has none
            self._poll = select.poll()
            # Linux flags a pipe's writing end with POLLERR once no reader is left, a socket with POLLHUP.
            self._poll.register(out.fileno(), select.POLLERR | select.POLLHUP)

    def gone(self) -> bool:
        return self._poll is not None and bool(self._poll.poll(0))


def import_sounddevice():
    """The sounddevice module; imported here only, as it loads PortAudio, which no other command needs."""
    try:
        import sounddevice
    except OSError as error:  # sounddevice's way of saying the PortAudio library is missing
        raise ListenError(
            f"cannot load PortAudio ({error}): install it (Debian/Ubuntu: apt-get install libportaudio2; "
            "Fedora: dnf install portaudio; macOS: brew install portaudio)"
        ) from None
    return sounddevice


def _devices(sd) -> list[dict]:
    return [dict(device, index=index) for index, device in enumerate(sd.query_devices())]


def input_devices(sd) -> list[dict]:
    return [device for device in _devices(sd) if device["max_input_channels"] > 0]


def _names(devices: list[dict]) -> str:
    return ", ".join(f"{device['index']} {device['name']!r}" for device in devices)


def _no_input_device(sd) -> ListenError:
    devices = _devices(sd)
    seen = f"PortAudio lists only outputs: {_names(devices)}" if devices else "PortAudio lists no devices"
    return ListenError(
        f"no audio input device found ({seen}); plug in a microphone and check that the system "
        "sees it (Linux: arecord -l; run as a service, that the user's sound server, PulseAudio or "
        "PipeWire, is running)"
    )


def _default_input(sd, devices: list[dict]) -> dict:
    """PortAudio's default input, or the first input where it names none."""
    default = sd.default.device[0]
    return next((device for device in devices if device["index"] == default), devices[0])


def pick_device(sd, wanted: str | None) -> dict:
    """The input device ``--device`` names by index, by name or by a unique part of its name."""
    devices = input_devices(sd)
    if not devices:
        raise _no_input_device(sd)
    if wanted is None:
        return _default_input(sd, devices)
    wanted = wanted.strip()
    matches = _matching(devices, wanted)
    if len(matches) == 1:
        return matches[0]
    outputs = _matching([device for device in _devices(sd) if device not in devices], wanted)
    if matches:
        problem = "names several input devices"
    elif outputs:
        problem = f"names only outputs, which record nothing ({_names(outputs)})"
    else:
        problem = "names no input device"
    raise ListenError(f"--device {wanted!r} {problem}; choose one of: {_names(matches or devices)}")


def _matching(devices: list[dict], wanted: str) -> list[dict]:
    """The devices ``wanted`` names: by index, by whole name, else by a part of the name (any case)."""
    if wanted.isdigit():
        return [device for device in devices if device["index"] == int(wanted)]
    return [device for device in devices if device["name"].lower() == wanted.lower()] or [
        device for device in devices if wanted.lower() in device["name"].lower()
    ]


def device_table() -> str:
    """The input devices, one a line: index, name, channels, default rate; the default marked *."""
    sd = import_sounddevice()
    devices = input_devices(sd)
    if not devices:
        raise _no_input_device(sd)
    default = _default_input(sd, devices)["index"]
    width = max(len(device["name"]) for device in devices)
    lines = [f"   {'index':>5}  {'name':<{width}}  channels  default rate"]
    for device in devices:
        mark = "*" if device["index"] == default else " "
        lines.append(
            f"{mark}  {device['index']:>5}  {device['name']:<{width}}  {device['max_input_channels']:>8}  "
            f"{device['default_samplerate']:>9.0f} Hz"
        )
    return "\n".join(lines + ["(* = used when no --device is given)"])


class FileInputStream:
    """Audio read from a file or a pipe, played like a microphone: the part of
    ``sounddevice.InputStream`` that ``run`` uses.

    A thread calls ``callback(block, frames, None, None)`` with float32 blocks of shape
    (``blocksize``, channels) at the audio's own rate, each when a microphone would have
    finished recording it (``realtime``) or as fast as the consumer takes them (a pipe: as they
    arrive), then ``finished_callback()`` at the end of the audio or on ``stop``. Audio that
    cannot be used (NaN, a decoding error midway, where ``kws detect`` reports the part before
    it) ends the play, and ``close`` raises its AudioError.
    """

    def __init__(
        self,
        recording: audio.NativeAudio,
        *,
        blocksize: int,
        callback,
        finished_callback=None,
        realtime: bool = True,
    ):
        self.recording = recording
        self.samplerate = recording.samplerate
        self.channels = recording.channels
        self.blocksize = blocksize
        self.realtime = realtime
        self._callback = callback
        self._finished_callback = finished_callback
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: AudioError | None = None

    def _play(self) -> None:
        started = time.monotonic()
        sent = 0
        try:
            for block in self.recording.blocks(self.blocksize):
                sent += len(block)
                due = started + sent / self.samplerate if self.realtime else 0.0
                if self._stopping.wait(max(0.0, due - time.monotonic())):
                    break
                self._callback(block, len(block), None, None)
        except AudioError as error:
            self._error = error
        finally:
            if self._finished_callback:
                self._finished_callback()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._play, name=f"play {self.recording.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # A file's thread ends within a block. A pipe's may wait on a writer that sends
            # nothing, and then ends with the process; a block it reads after the stop goes to a
            # consumer that has stopped taking them.
            self._thread.join(PIPE_STOP_SECONDS if self.recording.live else None)

    def close(self) -> None:
        self.stop()
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class Source:
    """An audio input: ``open(blocksize=, callback=, finished_callback=)`` makes its (unstarted) stream."""

    name: str
    samplerate: float
    open: Callable
    errors: tuple[type[Exception], ...] = ()  # what its stream raises for an input that cannot be used
    endless: bool = False  # a microphone: its stream ending means the device went away


def microphone(wanted: str | None = None) -> Source:
    """The input device ``--device`` names (default: PortAudio's), mono at its own default rate."""
    sd = import_sounddevice()
    device = pick_device(sd, wanted)
    name, rate = f"input device {device['index']} {device['name']!r}", device["default_samplerate"]
    if rate < MIN_SAMPLE_RATE:
        raise ListenError(
            f"{name} records at {rate:g} Hz, under the {MIN_SAMPLE_RATE} Hz the model needs: choose another "
            "--device (kws listen --list-devices)"
        )
    stream = functools.partial(
        sd.InputStream, device=device["index"], samplerate=rate, channels=1, dtype="float32"
    )
    return Source(name, rate, stream, (sd.PortAudioError,), endless=True)


def recording(path: str | Path | None, realtime: bool = True) -> Source:
    """An audio file played through the microphone's code path, in real time or as fast as
    possible; with ``path`` None, audio piped to standard input, as it arrives."""
    native = audio.NativeAudio(path)
    realtime = realtime and not native.live  # a pipe's writer sets its pace
    return Source(
        native.name, native.samplerate, functools.partial(FileInputStream, native, realtime=realtime)
    )


class Meter:
    """A one-line input level bar (RMS dBFS) for a terminal, redrawn at most every METER_SECONDS."""

    def __init__(self, out, enabled: bool):
        self.out = out
        self.enabled = enabled
        self._energy = 0.0
        self._count = 0
        self._drawn_at = -math.inf
        self._shown = False

    def add(self, samples: np.ndarray, seconds: float) -> None:
        if not self.enabled:
            return
        self._energy += float(np.dot(samples, samples))
        self._count += len(samples)
        now = time.monotonic()
        if now - self._drawn_at < METER_SECONDS:
            return
        level = 10 * math.log10(max(self._energy / self._count, 1e-12))
        filled = round(METER_WIDTH * min(1.0, max(0.0, 1 - level / METER_FLOOR_DB)))
        bar = "#" * filled + "-" * (METER_WIDTH - filled)
        self.out.write(f"\r{seconds:8.1f} s  [{bar}] {level:6.1f} dBFS")
        self.out.flush()
        self._energy, self._count, self._drawn_at, self._shown = 0.0, 0, now, True

    def clear(self) -> None:
        """Wipe the bar so that a line printed next starts clean."""
        if self._shown:
            self.out.write("\r\033[K")
            self.out.flush()
            self._shown = False


@dataclass
class Summary:
    seconds: float  # audio heard
    counts: dict[str, int]  # detections per keyword, every keyword of the model
    stopped_by: str | None  # "Ctrl-C", a signal's name or READER_GONE; None when the audio ended
    overflows: int = 0  # blocks after which the input had dropped audio

    def __str__(self) -> str:
        ending = {None: "", "Ctrl-C": " (stopped with Ctrl-C)"}.get(
            self.stopped_by, f" (stopped by {self.stopped_by})"
        )
        lost = (
            f"; audio was lost {self.overflows} time{'s' * (self.overflows != 1)} (the input overflowed: "
            "the machine fell behind), so later times run early"
            if self.overflows
            else ""
        )
        return f"listened {self.seconds:.1f} s{ending}: {detections_text(self.counts)}{lost}"


class _Consumer:
    """Blocks at the source's rate in: mixed to mono, resampled to 16 kHz, detected, printed, counted.

    Events print as terminal lines, or with ``as_json`` as one JSON object per line (the
    detections of ``kws detect --json``) and no level meter, for a program reading the pipe.
    """

    def __init__(self, samplerate: float, detector: Detector, out, as_json: bool):
        self.samplerate = samplerate
        self.labels = detector.labels
        self.stream = RateDetector(detector, samplerate)
        self.out = out
        self.as_json = as_json
        self.meter = Meter(out, enabled=out.isatty() and not as_json)
        self.frames = 0
        self.counts = Counter()

    @property
    def seconds(self) -> float:
        return self.frames / self.samplerate

    def hear(self, block: np.ndarray) -> None:
        mono = block.mean(axis=1, dtype=np.float32)
        self.frames += len(mono)
        self.meter.add(mono, self.seconds)
        self.report(self.stream.push(mono))

    def finish(self) -> None:
        self.report(self.stream.flush())

    def report(self, events: list[Event]) -> None:
        for event in events:
            self.meter.clear()
            print(json.dumps(event.to_dict()) if self.as_json else event, file=self.out, flush=True)
            self.counts[event.label] += 1

    def summary(self, stopped_by: str | None, overflows: int) -> Summary:
        counts = {label: self.counts[label] for label in keywords(self.labels)}
        return Summary(self.seconds, counts, stopped_by, overflows)


def _abandon(stream) -> None:
    """Abort and close ``stream`` after a failure, waiting ABORT_SECONDS at most. A device gone
    silent can hold PortAudio's stop for minutes, and a frozen sound server (PulseAudio stopped)
    held its abort for 60 s, deaf to signals; listening is over either way, and a stream left
    behind ends with the process. A signal meanwhile does not hide the failure being raised."""
    if not hasattr(stream, "abort"):  # a file or pipe: its close stops its thread, or leaves it
        stream.close()
        return

    stopped = threading.Event()  # not Thread.join: interrupted by a signal, it can call a thread ended

    def stop() -> None:
        with contextlib.suppress(Exception):  # the failure that brought us here is the one to tell
            stream.abort()
            stream.close()
        stopped.set()

    threading.Thread(target=stop, name="abort input", daemon=True).start()
    deadline = time.monotonic() + ABORT_SECONDS
    while not stopped.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(KeyboardInterrupt):
            stopped.wait(deadline - time.monotonic())
    exit_handler = getattr(sys.modules.get("sounddevice"), "_exit_handler", None)
    if not stopped.is_set() and exit_handler is not None:
        # sounddevice ends PortAudio as the process exits, which would wait on the stream left
        # behind: with PulseAudio frozen, for minutes.
        atexit.unregister(exit_handler)


def _next_block(blocks: queue.Queue, source: Source, reader: _ReaderWatch) -> np.ndarray | None:
    """The source's next block (None at its end); BrokenPipeError once the reader has gone,
    even while the source sends nothing. A microphone silent for STALL_SECONDS has died; a
    pipe's writer may pause (a camera's stream over a bad link) and ends by closing it."""
    deadline = time.monotonic() + (STALL_SECONDS if source.endless else math.inf)
    while (left := deadline - time.monotonic()) > 0:
        if reader.gone():
            raise BrokenPipeError
        with contextlib.suppress(queue.Empty):
            return blocks.get(timeout=min(left, READER_CHECK_SECONDS))
    raise ListenError(f"{source.name} delivered no audio for {STALL_SECONDS:g} s")


def run(
    source: Source,
    detector: Detector,
    out=sys.stdout,
    seconds: float | None = None,
    as_json: bool = False,
    on_audio: Callable[[], None] | None = None,
) -> Summary:
    """Print ``detector``'s events in ``source``'s audio until it ends, ``seconds`` are heard, or Ctrl-C.

    ``on_audio`` is called once, when the first audio arrives: a device can take a second or
    more to start, and words said before then are never heard.
    """
    blocks: queue.Queue = queue.Queue(QUEUE_BLOCKS)
    closing = threading.Event()  # set once nothing takes blocks any more: the source must not wait
    overflows = 0

    def hand_over(block: np.ndarray | None) -> None:
        # Waits while the queue is full (a file played --fast), but never once closing: a source
        # stuck here could not be closed.
        while not closing.is_set():
            try:
                blocks.put(block, timeout=0.05)
                return
            except queue.Full:
                continue

    def callback(indata, frames, time_info, status):
        nonlocal overflows
        overflows += bool(status and status.input_overflow)
        hand_over(indata.copy())  # nothing else on the audio thread: a late callback loses audio

    def finished():
        hand_over(None)

    consumer = _Consumer(source.samplerate, detector, out, as_json)  # its RateDetector resets detector
    reader = _ReaderWatch(out)
    limit = sys.maxsize if seconds is None else round(seconds * source.samplerate)
    stopped_by = None
    try:
        stream = source.open(
            blocksize=round(BLOCK_SECONDS * source.samplerate),
            callback=callback,
            finished_callback=finished,
        )
        try:
            stream.start()
            while consumer.frames < limit:
                if (block := _next_block(blocks, source, reader)) is None:
                    if source.endless:
                        consumer.meter.clear()
                        raise ListenError(
                            f"{source.name} stopped delivering audio after {consumer.seconds:.1f} s "
                            "(unplugged, or its sound server stopped)"
                        )
                    break
                if on_audio is not None:
                    on_audio()
                    on_audio = None
                consumer.hear(block[: limit - consumer.frames])
        except BaseException:
            closing.set()
            _abandon(stream)
            raise
        closing.set()
        stream.stop()
        stream.close()
        consumer.finish()
    except source.errors as error:
        raise ListenError(f"{source.name}: {error}") from None
    except BrokenPipeError:  # found by the watch, or by printing an event
        stopped_by = READER_GONE
    except Stopped as signal_stop:
        stopped_by = signal_stop.signal_name
    except KeyboardInterrupt:
        stopped_by = "Ctrl-C"
    consumer.meter.clear()
    return consumer.summary(stopped_by, overflows)
