"""`kws serve`: the streaming Detector over HTTP and WebSocket (FastAPI under uvicorn), without TensorFlow.

Endpoints (OpenAPI docs at ``/docs``):

- ``POST /detect``: one recording, as the raw request body (``audio/wav``, ``audio/flac``,
  ``audio/ogg``, ``application/octet-stream``) or as the file field of a multipart form;
  the formats of ``audio.FORMATS``, any sample rate from 8 to 768 kHz, mono or multichannel.
  Answers the JSON of ``kws detect --json``; its ``file`` is the multipart file name, else
  ``"upload"``.
  Query: ``threshold`` in (0, 1] replaces every keyword's threshold (``stop=0.99,go=0.95``
  those keywords' own), ``top_k`` >= 1 limits the class scores of 1 s clips.
- ``WS /stream``: live audio in, detection events out, one Detector per connection.
- ``GET /health`` (liveness, always 200), ``GET /ready`` (503 until the model is loaded, and
  while no worker process runs and none could be started),
  ``GET /model`` (labels, frontend, detection settings, sizes, accuracy), ``GET /metrics``
  (Prometheus).

WebSocket protocol of ``/stream``:

- Client -> server, binary messages: 16-bit little-endian PCM, mono, at 16 kHz, in chunks
  of any size up to 256 KiB (20 ms = 640 bytes is typical; a larger message closes the
  stream with code 1009). ``/stream?rate=44100`` announces another
  sample rate (8000 to 192000 Hz); the server resamples it on the fly.
- Client -> server, text message ``{"event": "end"}``: the audio is over. The server scores
  the last ~0.8 s, sends what it finds and closes the connection with code 1000.
  A client that just disconnects gets no events for its last ~0.8 s.
- Server -> client, text messages: one JSON object per detection as it happens,
  ``{"label": "yes", "score": 0.93, "start": 12.34, "end": 13.34}`` (seconds since the
  stream began), the same events as ``Detector.detect`` on the whole recording.
- Close codes: 1008 for an unknown query parameter, a bad ``rate`` or ``threshold``, a
  missing/wrong API key, a web page of an origin not allowed, no message for IDLE_SECONDS, or
  audio sent under MIN_STREAM_SPEED times real time over STREAM_WINDOW_S;
  1003 for a text message other than the end event; 1013 while the model is still loading or
  MAX_STREAMS streams are open.

Limits: bodies over ``max_bytes`` get 413 while they stream in (never held whole),
recordings over ``max_seconds`` get 413 before they are decoded, bodies that send nothing for
IDLE_SECONDS get 408, and headers still unfinished once MAX_HEADER_BYTES of them wait get 400.
With ``KWS_API_KEY`` set, everything but ``/health`` needs the key in ``X-API-Key`` or
``Authorization: Bearer``; WebSockets may pass it as ``?api_key=`` (browsers cannot set headers
there), and the query value is blanked out of uvicorn's logs.

Processes: this one answers HTTP and WebSockets; ``workers`` more, each with a copy of its model,
run POST /detect from one queue (kws.workers). Settings come from ``Settings`` or the
environment (``KWS_MODEL``, ``KWS_MAX_BYTES``, ``KWS_MAX_SECONDS``, ``KWS_WORKERS``,
``KWS_API_KEY``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from kws import __version__, options
from kws.audio import MIN_SAMPLE_RATE
from kws.features import SAMPLE_RATE
from kws.runtime import Model
from kws.stream import SCORED_CLIP_SECONDS, Detector, Event, RateDetector, detection_config
from kws.workers import (
    NO_WORKER,
    SHUTTING_DOWN,
    TOO_LONG_ADVICE,
    WAITING_PER_WORKER,
    RequestError,
    WorkerPool,
    default_workers,
)

log = logging.getLogger("uvicorn.error")  # uvicorn's general log, which it configures and prints

UPLOAD_NAME = "upload"  # the report's "file" when the body carries no file name
AUDIO_TYPES = ("audio/wav", "audio/flac", "audio/ogg", "audio/mpeg", "application/octet-stream")
STREAM_RATES = (MIN_SAMPLE_RATE, 192_000)  # what ?rate= may announce, in Hz
# Uploads held in the HTTP process at once, in bytes: beyond it, a request gets 503 rather than
# the process growing by each body (a hundred 10 MB uploads at once took it to 2 GB).
MAX_UPLOAD_BYTES = 100_000_000
# Streams are scored in the HTTP process, on one core: 60 streams of 20 ms messages kept up
# here (events at most 0.13 s late), a hundred fell seconds behind. Beyond this, a stream is
# refused (1013) rather than every stream running late.
MAX_STREAMS = 64
# A request body or a WebSocket that sends nothing for this long is dropped (408, or close 1008):
# idle clients would hold the upload budget and the stream places for ever. nginx's
# client_body_timeout and proxy_read_timeout, which apply to WebSockets too, wait as long.
IDLE_SECONDS = 60.0
# The largest WebSocket message (8 s at 16 kHz): the streams take turns, and one huge message
# would hold every other stream up while it is scored.
WS_MAX_BYTES = 256 * 1024
# A stream that sends under MIN_STREAM_SPEED times real time over a STREAM_WINDOW_S of the
# server waiting for it (a client trickling bytes to keep a place, or sending at a lower rate
# than its ?rate=) is closed (1008).
STREAM_WINDOW_S = 60.0
MIN_STREAM_SPEED = 0.5
# A stream behind real time goes before live ones by this much at most: a client that sent
# slowly for an hour would otherwise take every turn until it caught up.
CATCH_UP_S = 2.0
# Each message counts as at least this much audio in the streams' order, as a message costs the
# server ~0.1 ms whatever it holds: clients sending one sample a message (62 µs of audio) looked
# 2 s behind real time for as long as they sent, went before every live stream, and made those
# 1.6 s late. A browser's smallest block is 128 samples, 0.67 ms at the highest ?rate=.
MIN_MESSAGE_S = 128 / STREAM_RATES[1]
# A minute of audio costs a worker 0.07 s of CPU at 16 kHz, 0.55 s as 192 kHz stereo FLAC;
# longer recordings are for `kws detect`.
DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_MAX_SECONDS = 60.0
GIL_SWITCH_S = 0.0005  # the HTTP process's thread switch interval (Python's default: 0.005)
# How long a stopping server goes on answering the requests it holds; it refuses new ones.
GRACEFUL_SHUTDOWN_S = 5
# Of a request line and headers still unfinished, the most held (nginx's default buffers hold
# 32 kB): uvicorn's h11 parser answers 400 beyond it. A head that arrives whole in one read may
# be larger; memory stays bounded. httptools, uvicorn's faster default, buffers headers without end.
MAX_HEADER_BYTES = 32 * 1024


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # export folder or .tflite; None: the built-in model
    max_bytes: int = DEFAULT_MAX_BYTES
    max_seconds: float = DEFAULT_MAX_SECONDS
    workers: int = dataclasses.field(default_factory=default_workers)  # processes running POST /detect
    api_key: str | None = None
    # Web pages of other origins allowed to call the API (CORS) and open streams; "*": any.
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from KWS_* variables; ValueError naming the variable if one is malformed."""
        env = os.environ
        values: dict[str, Any] = {
            "model": env.get("KWS_MODEL") or None,
            "api_key": env.get("KWS_API_KEY") or None,
        }
        key = values["api_key"]
        if key and not (key.isascii() and key.isprintable()):
            raise ValueError("KWS_API_KEY must be printable ASCII: clients send it in an HTTP header")
        if key and key != key.strip():  # from an env file's "KWS_API_KEY=secret " line, say
            raise ValueError(
                "KWS_API_KEY starts or ends with a space, which HTTP strips from the header a client "
                "sends, so that no request would match it: remove the space"
            )
        # Parsed as the --max-bytes, --max-seconds and --workers options of `kws serve` are.
        for field, name, parse in (
            ("max_bytes", "KWS_MAX_BYTES", options.positive_int),
            ("max_seconds", "KWS_MAX_SECONDS", options.seconds),
            ("workers", "KWS_WORKERS", options.positive_int),
            ("cors_origins", "KWS_CORS_ORIGINS", options.origins),
        ):
            if (value := options.from_env(name, parse)) is not None:
                values[field] = value
        return cls(**values)


class Detection(BaseModel):
    label: str
    score: float = Field(description="the averaged score that fired")
    start: float = Field(description="seconds from the start of the recording")
    end: float


SHA256_DESCRIPTION = "SHA-256 of the .tflite: tells copies apart that share a name and version"


class ModelName(BaseModel):
    name: str | None
    version: str | None = Field(description="the kws version that exported the model")
    sha256: str = Field(description=SHA256_DESCRIPTION)


class Report(BaseModel):
    file: str = Field(description=f'the multipart file name, else "{UPLOAD_NAME}"')
    duration: float = Field(description="seconds of audio")
    detections: list[Detection]
    model: ModelName
    damaged: str | None = Field(
        None,
        description="only where the decoder found the audio damaged part way: why; the detections "
        "are those of the audio before it",
    )
    scores: dict[str, float] | None = Field(
        None,
        description=f"clips up to {SCORED_CLIP_SECONDS:g} s only: "
        "class scores of the best window, highest first",
    )


class Problem(BaseModel):
    """Every error's body, validation errors' too: one sentence a client can show."""

    detail: str = Field(description="what was wrong, and what to do")


class ModelInfo(BaseModel):
    name: str | None
    version: str | None
    sha256: str = Field(description=SHA256_DESCRIPTION)
    labels: list[str]
    frontend: dict[str, Any]
    detection: dict[str, Any] = Field(description="how scores become events, thresholds per keyword")
    sizes: dict[str, Any]
    accuracy: dict[str, Any]


class Metrics:
    """The app's Prometheus metrics; one registry per app, so that tests can build many apps."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kws_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kws_request_seconds", "HTTP request latency by endpoint", ["endpoint"], registry=self.registry
        )
        self.detections = Counter(
            "kws_detections",
            "Keyword detections by label (/detect and /stream)",
            ["label"],
            registry=self.registry,
        )
        # WebSockets are no HTTP requests: what a stream's clients see is counted here.
        self.open_streams = Gauge("kws_open_streams", "WebSocket streams open", registry=self.registry)
        self.refused_streams = Counter(
            "kws_streams_refused",
            "WebSocket streams closed before any audio: busy (1013, all places taken), loading "
            "(1013), bad_request (1008: a query parameter), origin (1008: a web page not allowed), "
            "api_key (1008)",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def count(self, events: list[dict]) -> None:
        for event in events:
            self.detections.labels(event["label"]).inc()


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request, labelled by route (unknown paths as "other")."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client sees if the app fails before answering
        start = time.perf_counter()

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            endpoint = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class AnswerAtShutdown:
    """ASGI middleware: an HTTP request still running when uvicorn's graceful shutdown ends
    (GRACEFUL_SHUTDOWN_S) is cancelled; its client gets 503 "shutting down: try again" rather
    than a 500, and the log gets no traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answering = False

        async def send_noting(message):
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        except asyncio.CancelledError:
            if answering:  # too late for another status
                raise
            # uvicorn cancels a request only at shutdown, never when its client leaves; caught
            # here, the cancellation ends the request's work, and the task goes on to answer.
            await JSONResponse({"detail": SHUTTING_DOWN}, 503)(scope, receive, send)


def _presented_keys(scope) -> list[str]:
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    keys = [headers.get("x-api-key", "")]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(token.strip())
    if scope["type"] == "websocket":
        # The literal name only, the one the docs give: a key under another spelling is refused
        # (RedactApiKey still blanks it from the log, whatever the case or percent-encoding).
        for pair in scope["query_string"].decode("latin-1").split("&"):
            name, _, value = pair.partition("=")
            if name == "api_key":
                keys.append(unquote_plus(value))
    return keys


class ApiKeyGuard:
    """ASGI middleware: with a key set, all but /health need it (else 401, or WebSocket close 1008)."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    def authorized(self, scope) -> bool:
        return any(hmac.compare_digest(key.encode(), self.key) for key in _presented_keys(scope))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] == "/health" or self.authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            # Accepted first: a close before the handshake reaches the client as a bare HTTP 403.
            if (await receive())["type"] != "websocket.connect":
                return  # the client left before its handshake finished
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
            self.metrics.refused_streams.labels("api_key").inc()
            return
        detail = "missing or wrong API key: send it as X-API-Key or Authorization: Bearer"
        response = JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class ForeignPages:
    """ASGI middleware: HTTP requests from web pages of origins not allowed get 403 (streams
    check their origin themselves, to close with 1008)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal = _origin_refusal(
                headers.get("origin"), self.allowed, _own_origin(scope, headers.get("host"))
            )
            if refusal:
                return await JSONResponse({"detail": refusal}, 403)(scope, receive, send)
        return await self.app(scope, receive, send)


def _own_origin(scope, host: str | None) -> str | None:
    """The origin of the pages this server serves itself (its /docs), where no other site can pose
    as it: at an IP address or localhost. Any site can rebind a host name of its own to the
    server (DNS rebinding), and its pages would then pass for the server's."""
    name = urlsplit(f"//{host}").hostname if host else None
    if name is None:
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if name != "localhost":
            return None
    return f"{scope['scheme']}://{host}"


class RedactApiKey(logging.Filter):
    """Blank ``api_key=`` query values out of log records: uvicorn logs request paths with their query.

    The name is matched decoded and in any case: a key sent as ``api%5Fkey=`` or ``API_KEY=`` is
    refused, but it may be the right key all the same."""

    pair = re.compile(r"(?<=[?&])([^=&\s\"]*)=([^&\s\"]*)")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True

    def _redact(self, text: str) -> str:
        return self.pair.sub(
            lambda pair: f"{pair[1]}=***" if unquote_plus(pair[1]).lower() == "api_key" else pair[0], text
        )


REDACT_API_KEY = RedactApiKey()


class UploadBudget:
    """The bytes of upload bodies this process holds at once (arriving, waiting for a worker
    process or being answered), counted as they arrive. A request whose next bytes would take
    them past ``limit`` gets 503, unless it is the oldest request held: a newcomer never costs
    an upload under way its bytes, and one upload of any size (up to --max-bytes) goes through.
    Idle connections hold nothing."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._shares: list[_Share] = []  # the requests held, oldest first

    @contextlib.contextmanager
    def share(self):
        """One request's part, ``take``n as its body arrives and given back when it ends."""
        share = _Share(self)
        self._shares.append(share)
        try:
            yield share
        finally:
            self._shares.remove(share)
            self.held -= share.taken

    def check(self, share: _Share, size: int) -> None:
        """HTTPException 503 unless ``share`` may take ``size`` more bytes."""
        if self.held + size > self.limit and self._shares[0] is not share:
            others = self.held - share.taken
            raise HTTPException(503, f"busy: {others:,} bytes of other uploads are held; try again")


class _Share:
    def __init__(self, budget: UploadBudget):
        self.budget, self.taken = budget, 0

    def take(self, size: int) -> None:
        self.budget.check(self, size)
        self.budget.held += size
        self.taken += size


async def _limited(request: Request, limit: int, share: _Share) -> AsyncIterator[bytes]:
    """The request body chunk by chunk, each taken from ``share``; 413 as soon as it passes
    ``limit`` bytes, 503 where the uploads held already fill the budget, 408 where it stalls."""
    declared = request.headers.get("content-length", "")
    if _is_number(declared) and int(declared) > limit:
        raise HTTPException(
            413, f"body of {int(declared):,} bytes, over the {limit:,} byte limit: {TOO_LONG_ADVICE}"
        )
    share.budget.check(share, 1)  # before reading any of it: would one byte more pass the limit?
    received = 0
    chunks = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), IDLE_SECONDS)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise HTTPException(
                408,
                f"the body stalled: nothing of it arrived for {IDLE_SECONDS:g} s after {received:,} "
                "bytes; send it again",
                headers={"Connection": "close"},  # the rest of a stalled body must not pass for a request
            ) from None
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"body over the {limit:,} byte limit: {TOO_LONG_ADVICE}")
        share.take(len(chunk))
        yield chunk


async def _upload(request: Request, limit: int, share: _Share) -> tuple[bytes, str]:
    """Audio bytes and their name, from a raw body or the first file of a multipart form."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        return b"".join([chunk async for chunk in _limited(request, limit, share)]), UPLOAD_NAME
    parser = MultiPartParser(request.headers, _limited(request, limit, share), max_files=1, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise HTTPException(400, f"malformed multipart body: {error.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        await form.close()
        raise HTTPException(
            400, "the multipart body holds no file: send the audio as a file field (-F file=@x.wav)"
        )
    data, name = await files[0].read(), files[0].filename or UPLOAD_NAME
    await form.close()
    if not data:
        raise HTTPException(400, f"the uploaded file {name!r} is empty: attach a recording")
    return data, name


class StreamSession:
    """One WebSocket's audio: PCM bytes -> (resampled) float samples -> its own Detector."""

    def __init__(self, model: Model, rate: int, threshold: float | dict[str, float] | None = None):
        self.detector = RateDetector(Detector(model, detection_config(model.manifest, threshold)), rate)
        self._odd_byte = b""  # half a sample that a message split

    def push(self, data: bytes) -> list[Event]:
        data = self._odd_byte + data
        whole = len(data) - len(data) % 2
        self._odd_byte = data[whole:]
        return self.detector.push(np.frombuffer(data[:whole], "<i2"))

    def finish(self) -> list[Event]:
        return self.detector.flush()


class StreamClock:
    """A stream's audio against the clock (anyio.current_time()): when its audio is due, which
    orders the streams' turns, and whether the client sends it fast enough."""

    def __init__(self):
        self.due = -math.inf  # when the audio received so far ends, had it come in real time
        self._window = (0.0, 0.0)  # the current window: seconds the server waited for the client, audio

    def heard(self, seconds: float, now: float, waited: float) -> str | None:
        """Count ``seconds`` more audio, arrived at ``now`` after the server ``waited`` for it;
        why the stream must close, if it sends too slowly. Only the time spent waiting for the
        client counts (not the server's own, scoring other streams), and each STREAM_WINDOW_S of
        it is judged alone: audio a client lost once (an overflow, a slow sound card) is not
        held against it for ever."""
        self.due = max(self.due, now - CATCH_UP_S) + max(seconds, MIN_MESSAGE_S)
        waiting, audio = self._window[0] + waited, self._window[1] + seconds
        self._window = (waiting, audio)
        if waiting < STREAM_WINDOW_S:
            return None
        self._window = (0.0, 0.0)
        if audio >= MIN_STREAM_SPEED * waiting:
            return None
        return (
            f"only {audio:.0f} s of audio in {waiting:.0f} s: send it as it is recorded, at the ?rate= given"
        )


class StreamTurns:
    """The streams' work, one at a time in a thread (the streams share one Model, whose
    interpreter runs one inference at a time), the stream whose audio is due first going first.
    In arrival order, four clients sending audio as fast as they could (16 s a message) put every
    live stream 40 s behind, until the pings of those streams went unanswered (1011); now a
    stream ahead of real time gets the time live streams leave. The due time, unlike how far
    ahead a stream is, does not change while it waits: a live stream that waited is not passed
    by those that came after it."""

    def __init__(self):
        self._busy = False
        self._waiting: list[tuple[float, int, anyio.Event]] = []  # a heap: due, arrival, its go
        self._arrivals = itertools.count()
        self._thread = anyio.CapacityLimiter(1)  # not anyio's shared one, which others may fill

    async def run(self, due: float, function, *args):
        if self._busy:
            turn = (due, next(self._arrivals), anyio.Event())
            heapq.heappush(self._waiting, turn)
            try:
                await turn[2].wait()
            except BaseException:  # the client went, or the server stops
                if turn[2].is_set():
                    self._hand_on()  # given the turn as it was cancelled: the next one's
                else:
                    self._waiting.remove(turn)
                    heapq.heapify(self._waiting)
                raise
        self._busy = True
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self._thread)
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        """The turn to the waiting stream due first, or free."""
        self._busy = bool(self._waiting)
        if self._waiting:
            heapq.heappop(self._waiting)[2].set()


# The query parameters each endpoint reads: any other is refused, as a misspelt one
# (?sampleRate=48000) would otherwise pass unnoticed and the audio be read at 16 kHz.
STREAM_PARAMETERS = ("rate", "threshold", "api_key")
DETECT_PARAMETERS = ("threshold", "top_k")


def _unknown_parameter(query_params, known: tuple[str, ...]) -> str | None:
    """What is wrong with a query holding a parameter the endpoint does not read, or one twice
    (of which the last would win unsaid), else None."""
    unknown = [name for name in query_params if name not in known]
    if unknown:
        return f"unknown query parameter {unknown[0]!r}: this endpoint reads {', '.join(known)}"
    twice = [name for name in known if len(query_params.getlist(name)) > 1]
    if twice:
        return f"query parameter {twice[0]!r} given {len(query_params.getlist(twice[0]))} times: give it once"
    return None


def _stream_rate(text: str | None) -> int | None:
    """The ?rate= of a stream; None if it is not a whole number of Hz in STREAM_RATES."""
    if text is None:
        return SAMPLE_RATE
    low, high = STREAM_RATES
    return int(text) if _is_number(text) and low <= int(text) <= high else None


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes "²", which int() refuses


END_MESSAGE_MAX_CHARS = 100  # '{"event": "end"}' with room for any spacing


def _is_end(text: str) -> bool:
    # Only a short text can be the end: "[" * 200000 had json.loads raise RecursionError, and the
    # connection ended without its 1003.
    if len(text) > END_MESSAGE_MAX_CHARS:
        return False
    try:
        return json.loads(text) == {"event": "end"}
    except ValueError:
        return False


async def _compute(websocket: WebSocket, clock: StreamClock, idle: anyio.CancelScope, function, *args):
    """Run a stream's work in its turn (~1.5 % of a core for a stream of 20 ms messages), the
    ``idle`` deadline lifted meanwhile: waiting for a turn is the server's time, not the client's."""
    idle.deadline = math.inf
    try:
        return await websocket.app.state.streams.run(clock.due, function, *args)
    finally:
        idle.deadline = anyio.current_time() + IDLE_SECONDS


async def _converse(websocket: WebSocket, session: StreamSession, metrics: Metrics) -> None:
    """Audio messages in, events out, until the client ends the stream, goes away or idles."""
    # One deadline, moved on by each message: a timeout around each receive (asyncio.wait_for)
    # makes a task per message, 12 µs against 4.5, or 3.5 % of a core for 60 streams of 20 ms
    # messages against 1.3 %.
    clock = StreamClock()
    with anyio.CancelScope() as idle:
        while True:
            asked = anyio.current_time()
            idle.deadline = asked + IDLE_SECONDS
            message = await websocket.receive()
            now = anyio.current_time()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                if len(message["bytes"]) > WS_MAX_BYTES:
                    await websocket.close(1009, f"a message holds at most {WS_MAX_BYTES // 1024} KiB")
                    return
                too_slow = clock.heard(len(message["bytes"]) / (2 * session.detector.rate), now, now - asked)
                if too_slow:
                    await websocket.close(1008, too_slow)
                    return
                events = await _compute(websocket, clock, idle, session.push, message["bytes"])
                await _send_events(websocket, metrics, events)
            elif _is_end(message.get("text") or ""):
                await _send_events(websocket, metrics, await _compute(websocket, clock, idle, session.finish))
                await websocket.close(1000)
                return
            else:
                await websocket.close(1003, 'text messages must be {"event": "end"}; audio goes as binary')
                return
    await websocket.close(1008, f"no message for {IDLE_SECONDS:g} s: send audio without pauses (silence too)")


async def _send_events(websocket: WebSocket, metrics: Metrics, events: list[Event]) -> None:
    found = [event.to_dict() for event in events]
    for event in found:
        await websocket.send_json(event)
    metrics.count(found)


async def _unless_client_leaves(request: Request, work):
    """The result of ``work``, or ClientDisconnect if the client hangs up first: its request is
    withdrawn then, and one still queued never reaches a worker process. (uvicorn never cancels
    a handler whose client left: clients that time out and retry would multiply the work.)"""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done, gone = asyncio.ensure_future(work), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
    if not done.done():  # cancelled just now: the client went first
        raise ClientDisconnect()
    return done.result()


def _threshold(text: str | None, manifest: dict) -> float | dict[str, float] | None:
    """The threshold query as kws detect's --threshold takes it; 422 saying what it must be."""
    if text is None:
        return None
    try:
        chosen = options.threshold(text)
        detection_config(manifest, chosen)
    except argparse.ArgumentTypeError as error:  # "must be ..."
        raise HTTPException(422, f"threshold {error}") from None
    except ValueError as error:
        raise HTTPException(422, f"threshold: {error}") from None
    return chosen


def _model_info(model: Model) -> dict:
    manifest = model.manifest
    return {
        **model.identity,
        "labels": manifest["labels"],
        "frontend": manifest["frontend"],
        "detection": detection_config(manifest).to_dict(),
        "sizes": manifest.get("sizes", {}),
        "accuracy": manifest.get("accuracy", {}),
    }


CLIENT_GONE = 499  # the status counted for a request whose client hung up before its answer

DETECT_BODY = {
    "required": True,
    "content": {
        **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in AUDIO_TYPES},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
DETECT_ERRORS = {
    status: {"description": description, "model": Problem}
    for status, description in {
        400: "empty body, or a multipart form without a file",
        401: "KWS_API_KEY is set and the request lacks it",
        403: "sent by a web page of an origin not allowed (kws serve --cors-origin)",
        408: f"no part of the body arrived for {IDLE_SECONDS:g} s",
        413: "body over the byte limit or audio over the duration limit",
        415: "not audio that can be used; the detail gives the decoder's reason",
        422: "a query parameter that is unknown, given twice or has a value it cannot take",
        503: "no worker process can take it now (the model is loading, a process died on it or got "
        f"stuck, {WAITING_PER_WORKER} requests per process already wait, the uploads held fill its "
        f"{MAX_UPLOAD_BYTES // 1_000_000} MB, or the server is shutting down): try again",
    }.items()
}


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Load the model and start the worker processes; stop them when the server stops."""
    settings = app.state.settings
    model = await run_in_threadpool(Model.load, settings.model)
    workers = WorkerPool(model, settings.workers)
    try:
        await workers.start()
        app.state.model, app.state.workers = model, workers
        app.state.streams = StreamTurns()
        app.state.open_streams = 0
        app.state.uploads = UploadBudget(MAX_UPLOAD_BYTES)
        log.info(
            "kws %s serving model %s (%s labels) with %d worker process%s",
            __version__,
            model.manifest.get("name"),
            len(model.labels),
            settings.workers,
            "es" * (settings.workers != 1),
        )
        yield
    finally:
        app.state.model = None
        await workers.close()


def _model_of(request: Request) -> Model:
    model = request.app.state.model
    if model is None:
        raise HTTPException(503, "the model is not loaded yet")
    return model


async def _invalid_query(request: Request, error: RequestValidationError) -> Response:
    # FastAPI's own answer is a list of objects, where every other error of this API is one
    # sentence: a client reads error.detail the same way whatever went wrong.
    return JSONResponse({"detail": "; ".join(map(_problem_text, error.errors()))}, status_code=422)


def _problem_text(problem: dict) -> str:
    """One validation error as "top_k: Input should be ..." (its loc is ("query", "top_k"))."""
    where = ".".join(map(str, problem.get("loc", ())[1:]))
    return f"{where}: {problem['msg']}" if where else problem["msg"]


async def _client_gone(request: Request, error: ClientDisconnect) -> Response:
    # Nobody reads it; nginx's 499 tells the metrics' clients who left from bad requests (400).
    return Response(status_code=CLIENT_GONE)


routes = APIRouter()


# The small endpoints are async because they never wait: FastAPI would run a plain def in
# a thread, ~0.3 ms per call that a busy server's health checks would pay.
@routes.get("/health", summary="liveness: always 200")
async def health() -> dict:
    return {"status": "ok"}


@routes.head("/health", include_in_schema=False)  # some load balancers' probes send HEAD
async def health_head() -> Response:
    return Response()


@routes.get("/ready", summary="readiness: 503 until the model is loaded or while no worker can start")
async def ready(request: Request) -> dict:
    name = _model_of(request).manifest.get("name")
    if request.app.state.workers.failing:
        raise HTTPException(503, NO_WORKER)
    return {"status": "ready", "model": name}


@routes.get("/model", response_model=ModelInfo, summary="the model's labels, frontend, thresholds, sizes")
async def model_info(request: Request) -> dict:
    return _model_info(_model_of(request))


@routes.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@routes.post(
    "/detect",
    response_model=Report,
    response_model_exclude_unset=True,
    summary="find keywords in one recording (the JSON of kws detect --json)",
    openapi_extra={"requestBody": DETECT_BODY},
    responses=DETECT_ERRORS,
)
async def detect(
    request: Request,
    threshold: str | None = Query(
        None,
        description="one threshold in (0, 1] for every keyword (default: the model's calibrated "
        "ones), or some keywords' own, the others keeping theirs: stop=0.99,go=0.95",
        examples=["0.7", "stop=0.99,go=0.95"],
    ),
    top_k: int | None = Query(None, ge=1, description="class scores to list for clips of about 1 s"),
) -> dict:
    settings, state = request.app.state.settings, request.app.state
    unknown = _unknown_parameter(request.query_params, DETECT_PARAMETERS)
    if unknown:
        raise HTTPException(422, unknown)
    chosen = _threshold(threshold, _model_of(request).manifest)
    with state.uploads.share() as share:
        data, name = await _upload(request, settings.max_bytes, share)
        if not data:
            raise HTTPException(400, "empty body: send the audio file's bytes (curl --data-binary @clip.wav)")
        try:
            report = await _unless_client_leaves(
                request, state.workers.detect(data, name, settings.max_seconds, chosen, top_k)
            )
        except RequestError as error:
            raise HTTPException(error.status, error.detail) from None
    state.metrics.count(report["detections"])
    return report


@routes.get("/stream", include_in_schema=False)
async def stream_over_http() -> Response:
    # A browser or curl opening the stream's address: 404 would say it does not exist.
    detail = "/stream is a WebSocket: connect to ws://HOST:PORT/stream and send 16-bit PCM (see README)"
    return JSONResponse({"detail": detail}, status_code=426, headers={"Upgrade": "websocket"})


class _Refused(Exception):
    """A stream closed before any audio: its close code, reason and kind (for the metrics)."""

    def __init__(self, code: int, reason: str, kind: str):
        super().__init__(reason)
        self.code, self.reason, self.kind = code, reason, kind


def _origin_refusal(origin: str | None, allowed: tuple[str, ...], own: str | None = None) -> str | None:
    """Why a web page of ``origin`` may not call this server, else None. Browsers send a page's
    origin, and let any page open a WebSocket to any address or POST a body to it: without this
    check, any site a user visits could take the server's stream places or queue work for its
    workers. Clients other than browsers send no origin. Pages of the server's ``own`` origin
    are let in (its /docs post from there); streams give none, as this server serves no page
    that streams."""
    if origin is None or origin in allowed or "*" in allowed or origin == own:
        return None
    # Short: a close reason holds 123 bytes. A local file's page or a sandboxed one sends "null".
    fix = "serve the page over http" if origin == "null" else f"kws serve --cors-origin {origin}"
    return f"origin {origin} not allowed: {fix}"


def _new_session(websocket: WebSocket) -> StreamSession:
    """The stream its query asks for; _Refused if it cannot be served."""
    state, query = websocket.app.state, websocket.query_params
    refusal = _origin_refusal(websocket.headers.get("origin"), state.settings.cors_origins)
    if refusal:
        raise _Refused(1008, refusal, "origin")
    unknown = _unknown_parameter(query, STREAM_PARAMETERS)
    if unknown:
        raise _Refused(1008, unknown, "bad_request")
    rate = _stream_rate(query.get("rate"))
    if rate is None:
        low, high = STREAM_RATES
        raise _Refused(1008, f"rate must be a whole number of Hz from {low} to {high}", "bad_request")
    if state.model is None:
        raise _Refused(1013, "the model is not loaded yet", "loading")
    try:
        threshold = _threshold(query.get("threshold"), state.model.manifest)
    except HTTPException as error:
        raise _Refused(1008, error.detail, "bad_request") from None
    if state.open_streams >= MAX_STREAMS:
        raise _Refused(
            1013, f"busy: {MAX_STREAMS} streams are open, the most served; try again later", "busy"
        )
    return StreamSession(state.model, rate, threshold)


@routes.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    state = websocket.app.state
    try:
        session = _new_session(websocket)
    except _Refused as refused:  # a close reason holds 123 bytes at most
        state.metrics.refused_streams.labels(refused.kind).inc()
        await websocket.close(refused.code, refused.reason.encode()[:123].decode(errors="ignore"))
        return
    state.open_streams += 1
    try:
        with contextlib.suppress(WebSocketDisconnect):
            await _converse(websocket, session, state.metrics)
    finally:
        state.open_streams -= 1


# OpenAPI has no WebSockets: /docs teaches the stream's protocol here.
API_DESCRIPTION = f"""Keyword spotting: keywords in recordings (POST /detect) or in live audio
(WebSocket /stream).

**WebSocket `/stream`** (`?rate=` {STREAM_RATES[0]} to {STREAM_RATES[1]} Hz, default {SAMPLE_RATE};
`?threshold=` as POST /detect's): send the audio as binary messages of 16-bit little-endian mono
PCM, any size up to {WS_MAX_BYTES // 1024} KiB, then the text message `{{"event": "end"}}`:
the server scores the last 0.8 s, sends its events and closes with 1000 (a client that closes
first loses them). Each detection comes as a text message, the JSON of `Detection` below, seconds
from the stream's start. A stream sent faster than real time is scored in the time live streams
leave. Close codes: 1003 a text message other than the end;
1008 an unknown or bad query parameter, a missing API key, a web page of an origin not allowed
(--cors-origin), no message for {IDLE_SECONDS:g} s, or under {MIN_STREAM_SPEED:g} s of audio a
second over {STREAM_WINDOW_S:g} s (sent slower than its rate); 1009 a message over the size; 1011
no answer to the server's pings; 1012 the server is stopping; 1013 the model is loading or
{MAX_STREAMS} streams are open.

**Errors** are JSON `{{"detail": "..."}}`, one sentence. With an API key set, every endpoint but
/health needs it as `X-API-Key` or `Authorization: Bearer`; a WebSocket may send `?api_key=`."""


def _with_api_key_in_schema(app: FastAPI) -> None:
    """Declare the API key in the OpenAPI schema, so that clients generated from it send it."""
    schema = app.openapi()
    schema.setdefault("components", {})["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    schema["security"] = [{"ApiKey": []}, {"Bearer": []}]
    for operation in schema["paths"]["/health"].values():
        operation["security"] = []  # the one endpoint that needs no key


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app; its model and worker processes load when it starts (the lifespan)."""
    app = FastAPI(title="kws", version=__version__, description=API_DESCRIPTION, lifespan=_lifespan)
    app.state.settings, app.state.metrics, app.state.model = settings, Metrics(), None
    app.state.metrics.open_streams.set_function(lambda: getattr(app.state, "open_streams", 0))
    app.include_router(routes)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(RequestValidationError, _invalid_query)
    app.add_middleware(AnswerAtShutdown)
    app.add_middleware(ForeignPages, allowed=settings.cors_origins)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, key=settings.api_key, metrics=app.state.metrics)
        _with_api_key_in_schema(app)
    # Requests are counted by path, the app's own and its docs'; any other path (a scan) as "other".
    docs = (app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url)
    paths = {*docs, *(route.path for route in routes.routes)}
    app.add_middleware(RequestMetrics, metrics=app.state.metrics, paths=paths)
    if settings.cors_origins:  # added last, so outermost: a preflight needs no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization"],
        )
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(REDACT_API_KEY)
    return app


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the app under uvicorn: one process for HTTP, ``settings.workers`` for detection."""
    import uvicorn

    # The WebSocket streams' work runs in a thread of this process, and while it holds the GIL
    # the event loop waits up to the switch interval (5 ms by default) to answer anything else.
    sys.setswitchinterval(GIL_SWITCH_S)
    # A closed terminal stops the server as docker stop (SIGTERM) does; unless the process was told
    # to ignore it (nohup, a supervisor), which is left as it is.
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # Above the app's own limit, which closes with 1009 and a reason: uvicorn's, reached
        # mid-message, drops the connection with the close frame often lost (1006).
        ws_max_size=4 * WS_MAX_BYTES,
        # PCM barely compresses: inflating every message would cost CPU for nothing.
        ws_per_message_deflate=False,
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
