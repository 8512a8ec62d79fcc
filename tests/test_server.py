"""kws serve: /detect is kws detect --json, bad input and limits are 4xx never 5xx, the WebSocket
stream gives Detector.detect's events, auth, metrics, a real server process, and the Dockerfile."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import anyio
import httpx2
import numpy as np
import pytest
import schemathesis
import soundfile as sf
import soxr
from conftest import REPO, WORD_TONES, readme_code, tone
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from starlette.websockets import WebSocketDisconnect

from kws import audio, workers
from kws.cli import main
from kws.features import CLIP_SAMPLES, SAMPLE_RATE
from kws.runtime import BUILT_IN_MODEL, Model
from kws.server import (
    CATCH_UP_S,
    DETECT_PARAMETERS,
    STREAM_WINDOW_S,
    WS_MAX_BYTES,
    AnswerAtShutdown,
    Settings,
    StreamClock,
    StreamTurns,
    UploadBudget,
    create_app,
    routes,
)
from kws.stream import Detector, detection_config, recording_report
from kws.workers import RequestError, WorkerPool, default_workers

API_KEY = "s3cret-key-for-tests"
END = json.dumps({"event": "end"})


def recording(words: list[str], gap_s: float = 1.0, seed: int = 0) -> np.ndarray:
    """Tone 'words' with quiet gaps between them, as 16-bit values scaled to [-1, 1)."""
    rng = np.random.default_rng(seed)
    pieces = []
    for i, word in enumerate(words):
        pieces += [0.003 * rng.standard_normal(int(gap_s * SAMPLE_RATE)), tone(WORD_TONES[word], seed=50 + i)]
    pieces.append(np.zeros(SAMPLE_RATE // 2))
    return pcm16(np.concatenate(pieces))


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Samples as a 16-bit file or stream carries them, so every path sees the same values."""
    return (np.round(np.clip(samples, -1, 1 - 2**-15) * 32768) / 32768).astype(np.float32)


def encode(samples: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def frames(samples: np.ndarray, size: int) -> list[bytes]:
    """Samples as the 16-bit little-endian PCM messages of a stream client, ``size`` bytes each."""
    data = (samples * 32768).astype("<i2").tobytes()
    return [data[start : start + size] for start in range(0, len(data), size)]


@pytest.fixture(scope="module")
def export(tone_export) -> Path:
    return tone_export[0]


@pytest.fixture(scope="module")
def model(export) -> Model:
    return Model.load(export)


@pytest.fixture(scope="module")
def client(export):
    with TestClient(create_app(Settings(model=str(export)))) as client:
        yield client


@contextlib.contextmanager
def fresh_client(export: Path, **options):
    """A client of a new app (its own metrics and limits)."""
    with TestClient(create_app(Settings(model=str(export), **options))) as client:
        yield client


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return recording(["up"], gap_s=0.0)[:CLIP_SAMPLES]


@pytest.fixture(scope="module")
def long_recording() -> np.ndarray:
    return recording(["yes", "no", "up", "down", "yes"])


# POST /detect


@pytest.mark.parametrize("kind", ["clip", "long"])
def test_detect_equals_kws_detect_json(
    kind, client, export, clip, long_recording, tmp_path, monkeypatch, capsys
):
    data = encode(clip if kind == "clip" else long_recording)
    (tmp_path / "audio.wav").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "audio.wav", "--model", str(export), "--json", "--top-k", "3"]) == 0
    expected = json.loads(capsys.readouterr().out)

    multipart = client.post("/detect?top_k=3", files={"file": ("audio.wav", data, "audio/wav")})
    raw = client.post("/detect?top_k=3", content=data, headers={"Content-Type": "audio/wav"})
    assert multipart.status_code == raw.status_code == 200
    assert multipart.json() == expected
    assert raw.json() == {**expected, "file": "upload"}
    if kind == "clip":
        assert len(expected["scores"]) == 3 and list(expected["scores"])[0] == "up"
    else:
        assert "scores" not in expected and len(expected["detections"]) >= 3


def test_an_upload_damaged_midway_gets_what_kws_detect_gives(
    client, export, long_recording, tmp_path, capsys
):
    whole = encode(np.tile(long_recording, 3), fmt="FLAC")
    cut = whole[: len(whole) * 6 // 10]  # a copy that stopped at 60 %
    (tmp_path / "cut.flac").write_bytes(cut)
    assert main(["detect", str(tmp_path / "cut.flac"), "--model", str(export), "--json"]) == 1
    expected = json.loads(capsys.readouterr().out)
    assert expected["damaged"].startswith(f"{tmp_path / 'cut.flac'}: cannot decode audio (")
    assert expected["detections"] and expected["duration"] > 0
    answer = client.post("/detect", files={"file": (str(tmp_path / "cut.flac"), cut, "audio/flac")})
    assert answer.status_code == 200 and answer.json() == expected  # was 415


def test_threshold_override_changes_detections(client, model, long_recording):
    data = encode(long_recording)
    low = client.post("/detect?threshold=0.5", content=data).json()["detections"]
    certain = client.post("/detect?threshold=1", content=data).json()["detections"]
    expected = recording_report(Detector(model, detection_config(model.manifest, 0.5)), [long_recording], "x")
    assert low == expected["detections"] and len(low) >= 4
    at_one = recording_report(Detector(model, detection_config(model.manifest, 1.0)), [long_recording], "x")
    assert certain == at_one["detections"] and len(certain) < len(low)
    # Some keywords' own, as kws detect --threshold takes them: the others keep the model's.
    some = client.post("/detect?threshold=yes=0.5,no=0.5", content=data).json()["detections"]
    config = detection_config(model.manifest, {"yes": 0.5, "no": 0.5})
    assert some == recording_report(Detector(model, config), [long_recording], "x")["detections"] != low


def test_top_k_limits_the_scores(client, model, clip):
    data = encode(clip)
    every = client.post("/detect", content=data).json()["scores"]
    two = client.post("/detect?top_k=2", content=data).json()["scores"]
    huge = client.post(f"/detect?top_k={10**30}", content=data).json()["scores"]
    assert len(every) == len(model.labels) and every == huge
    assert two == dict(list(every.items())[:2])


@pytest.mark.parametrize(
    "query",
    [
        "threshold=0",
        "threshold=1.5",
        "threshold=-0.2",
        "threshold=nan",
        "threshold=abc",
        "threshold=yes=2",
        "threshold=yes=0.5,",
        "threshold=nope=0.5",  # not a keyword of the model
        "top_k=0",
        "top_k=1.5",
        "thresold=0.7",  # misspelt: it would be ignored, and the calibrated thresholds used
        "threshold=0.7&rate=48000",  # a stream's parameter
        "threshold=0.5&threshold=0.9",  # the last would win, unsaid
        "threshold=stop=0.5,stop=0.9",
        "threshold=%D9%A1",  # an Arabic-Indic one, which float() reads as 1
    ],
)
def test_bad_query_values_get_422(client, clip, query):
    answer = client.post(f"/detect?{query}", content=encode(clip))
    assert answer.status_code == 422
    assert isinstance(answer.json()["detail"], str)  # one sentence, as every other error's
    if query == "top_k=0":
        assert answer.json()["detail"] == "top_k: Input should be greater than or equal to 1"
    if "=0.7" in query:
        unknown = query.split("&")[-1].split("=")[0]
        assert answer.json()["detail"] == (
            f"unknown query parameter {unknown!r}: this endpoint reads threshold, top_k"
        )
    elif "&threshold" in query:
        assert answer.json()["detail"] == "query parameter 'threshold' given 2 times: give it once"
    elif query.startswith("threshold"):  # in the words kws detect --threshold uses
        assert answer.json()["detail"].startswith(
            ("threshold must be a score", "threshold: thresholds for nope", "threshold gives stop twice")
        )


def test_multipart_without_a_file_or_with_an_empty_one_gets_400(client):
    response = client.post("/detect", files={"note": (None, "no audio here")})
    assert response.status_code == 400 and "no file" in response.json()["detail"]
    response = client.post("/detect", files={"file": ("zero.wav", b"", "audio/wav")})
    assert response.status_code == 400
    assert response.json()["detail"] == "the uploaded file 'zero.wav' is empty: attach a recording"


def test_limits_give_413(export):
    with fresh_client(export, max_bytes=50_000, max_seconds=2.0) as client:
        long_body = encode(np.zeros(3 * SAMPLE_RATE, np.float32))  # 96 kB
        long_audio = encode(np.zeros(3 * 8000, np.float32), 8000, "PCM_U8")  # 24 kB but 3 s
        fits = encode(np.zeros(int(1.5 * SAMPLE_RATE), np.float32))  # 48 kB, 1.5 s
        refused = client.post("/detect", content=long_body)
        assert refused.status_code == 413 and refused.json()["detail"].endswith(workers.TOO_LONG_ADVICE)
        assert (
            client.post("/detect", content=iter([long_body[:40_000], long_body[40_000:]])).status_code == 413
        )
        assert client.post("/detect", files={"file": ("a.wav", long_body)}).status_code == 413
        too_long = client.post("/detect", content=long_audio)
        assert too_long.status_code == 413 and "3.0 s" in too_long.json()["detail"]
        assert too_long.json()["detail"].endswith(": " + workers.TOO_LONG_ADVICE)
        assert client.post("/detect", content=encode(np.zeros(3 * 8000), 8000, fmt="FLAC")).status_code == 413
        answer = client.post("/detect", content=fits).json()
        assert answer["duration"] == 1.5 and "scores" in answer  # 1.5 s still gets the clip's scores
        longer = encode(np.zeros(int(1.5 * SAMPLE_RATE) + 320, np.float32))
        assert "scores" not in client.post("/detect", content=longer).json()
    with fresh_client(export, max_bytes=len(fits)) as client:  # a body of exactly the limit fits
        assert client.post("/detect", content=fits).status_code == 200


def malformed_corpus() -> dict[str, tuple[bytes, int | None]]:
    """Upload name -> (bytes, the status it must get, or None where 200 and 4xx are both fair)."""
    rng = np.random.default_rng(7)
    word = tone(WORD_TONES["yes"])
    wav = encode(word)

    def header(channels=1, rate=16000, bits=16, fmt=1, data_size=32000, riff_size=None) -> bytes:
        block = channels * bits // 8
        chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * block, block, bits)
        body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + chunk + b"data" + struct.pack("<I", data_size)
        return (
            b"RIFF" + struct.pack("<I", riff_size if riff_size is not None else len(body) + data_size) + body
        )

    nan = np.full(16000, np.nan, np.float32)
    return {
        "empty": (b"", 400),
        "one byte": (b"R", 415),
        "RIFF only": (b"RIFF", 415),
        "random bytes": (rng.bytes(5000), 415),
        "random bytes after a RIFF header": (
            b"RIFF" + struct.pack("<I", 5000) + b"WAVE" + rng.bytes(5000),
            415,
        ),
        "truncated header": (wav[:30], 415),
        "header only": (header(data_size=0), 415),
        "data size past the end": (header(data_size=10**9) + wav[44:], None),
        "RIFF size 0xFFFFFFFF": (header(riff_size=0xFFFFFFFF) + wav[44:], None),
        "6 channels, 7 bytes": (header(channels=6) + rng.bytes(7), None),
        "0 channels": (header(channels=0) + wav[44:], None),
        "0 Hz": (header(rate=0) + wav[44:], None),
        "1 Hz": (header(rate=1) + wav[44:], 415),
        "4 kHz": (encode(word[::4], 4000), 415),
        "2**31 Hz": (header(rate=2**31 - 1) + wav[44:], 415),
        "1 MHz": (header(rate=1_000_000) + wav[44:], 415),
        "12 bits": (header(bits=12) + wav[44:], None),
        "format 0xBEEF": (header(fmt=0xBEEF) + wav[44:], None),
        "truncated FLAC": (encode(word, fmt="FLAC")[:500], None),
        "OggS and noise": (b"OggS" + rng.bytes(3000), 415),
        "NaN float": (encode(nan, subtype="FLOAT"), 415),
        "inf float": (encode(np.full(100, np.inf, np.float32), subtype="FLOAT"), 415),
        "no samples": (encode(np.zeros(0, np.float32)), 415),
        "1e30 float": (encode(np.full(16000, 1e30, np.float32), subtype="FLOAT"), 200),
        "1 sample": (encode(np.array([0.5], np.float32)), 200),
        "8 kHz": (encode(word[::2], 8000), 200),
        "48 kHz": (encode(soxr.resample(word, 16000, 48000), 48000), 200),
        "24-bit": (encode(word, subtype="PCM_24"), 200),
        "float": (encode(word, subtype="FLOAT"), 200),
        "6 channels": (encode(np.tile(word[:, None], (1, 6))), 200),
        "44.1 kHz stereo FLAC, 20 s": (
            encode(np.tile(tone(500, 20, 44100)[:, None], 2), 44100, fmt="FLAC"),
            200,
        ),
    }


CORPUS = malformed_corpus()


@pytest.mark.parametrize("name", list(CORPUS))
def test_malformed_audio_gets_an_answer_never_a_5xx(client, name):
    data, expected = CORPUS[name]
    response = client.post("/detect", content=data)
    assert response.status_code < 500
    assert response.status_code == expected if expected else response.status_code in (200, 413, 415)
    if response.status_code == 200:
        assert response.json()["duration"] >= 0 and response.json()["model"]["name"]
    else:
        assert response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_odd_clips_get_their_true_duration(client):
    assert client.post("/detect", content=CORPUS["1 sample"][0]).json()["duration"] == 0.0
    assert client.post("/detect", content=CORPUS["8 kHz"][0]).json()["duration"] == 1.0
    report = client.post("/detect", content=CORPUS["48 kHz"][0]).json()
    assert report["duration"] == 1.0 and list(report["scores"])[0] == "yes"


# health, readiness, model, metrics


def test_ready_is_503_until_the_model_is_loaded(export):
    app = create_app(Settings(model=str(export)))
    unstarted = TestClient(app)  # outside `with`, the lifespan (model loading) has not run
    assert unstarted.get("/health").status_code == 200
    assert unstarted.get("/ready").status_code == 503
    assert unstarted.post("/detect", content=b"RIFF").status_code == 503
    with TestClient(app) as started:
        assert started.get("/ready").json() == {
            "status": "ready",
            "model": Model.load(export).manifest["name"],
        }


def test_model_describes_labels_thresholds_and_sizes(client, model):
    info = client.get("/model").json()
    assert info["labels"] == model.labels
    assert info["sha256"] == hashlib.sha256(model.content).hexdigest() == model.sha256
    reported = client.post("/detect", content=encode(np.zeros(16000, np.float32))).json()["model"]
    assert reported == {"name": info["name"], "version": info["version"], "sha256": info["sha256"]}
    assert info["detection"] == detection_config(model.manifest).to_dict()
    assert info["sizes"] == model.manifest["sizes"] and info["accuracy"] == model.manifest["accuracy"]
    assert info["frontend"]["num_mfcc"] == 10


def metric_samples(text: str) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_latency_and_detections(export, long_recording):
    with fresh_client(export) as client:
        reports = [
            client.post("/detect?threshold=0.5", content=encode(long_recording)).json() for _ in range(2)
        ]
        assert client.post("/detect", content=b"not audio").status_code == 415
        for path in ("/docs", "/docs/oauth2-redirect", "/openapi.json"):
            assert client.get(path).status_code == 200
        assert client.get("/wp-login.php").status_code == 404
        samples = metric_samples(client.get("/metrics").text)
    for path in ("/docs", "/docs/oauth2-redirect", "/openapi.json"):
        assert samples[("kws_requests_total", (("endpoint", path), ("status", "200")))] == 1
    assert samples[("kws_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    assert samples[("kws_requests_total", (("endpoint", "/detect"), ("status", "200")))] == 2
    assert samples[("kws_requests_total", (("endpoint", "/detect"), ("status", "415")))] == 1
    assert samples[("kws_request_seconds_count", (("endpoint", "/detect"),))] == 3
    found = [event["label"] for report in reports for event in report["detections"]]
    assert len(found) >= 8
    for label in set(found):
        assert samples[("kws_detections_total", (("label", label),))] == found.count(label)


def test_metrics_count_open_and_refused_streams(export):
    with fresh_client(export) as client:
        with client.websocket_connect("/stream") as ws:
            ws.send_bytes(np.zeros(320, "<i2").tobytes())
            while_open = metric_samples(client.get("/metrics").text)
            ws.send_text(END)
            with pytest.raises(WebSocketDisconnect):
                ws.receive_text()
        for query in ("sampleRate=48000", "rate=5"):
            with pytest.raises(WebSocketDisconnect), client.websocket_connect(f"/stream?{query}") as ws:
                ws.receive_text()
        samples = metric_samples(client.get("/metrics").text)
    assert while_open[("kws_open_streams", ())] == 1 and samples[("kws_open_streams", ())] == 0
    assert samples[("kws_streams_refused_total", (("reason", "bad_request"),))] == 2


# API key


def test_api_key_guards_everything_but_health(export):
    with fresh_client(export, api_key=API_KEY) as client:
        assert client.get("/health").status_code == 200 and client.head("/health").status_code == 200
        for path in ("/ready", "/model", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 401
        assert client.get("/model", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/model", headers={"X-API-Key": API_KEY}).status_code == 200
        assert client.get("/model", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.get("/model", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
        assert client.get(f"/model?api_key={API_KEY}").status_code == 401  # query keys are for WebSockets
        # Each stream ends at once: let in by mistake, it closes with 1000 rather than hang the test.
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/stream") as ws:
            ws.send_text(END)
            ws.receive_text()
        assert refused.value.code == 1008
        # A name written percent-encoded is no key: the log filter would not blank it.
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            client.websocket_connect(f"/stream?api_%6Bey={API_KEY}") as ws,
        ):
            ws.send_text(END)
            ws.receive_text()
        assert refused.value.code == 1008
        with client.websocket_connect(f"/stream?api_key={API_KEY}") as ws:
            ws.send_text(END)
            with pytest.raises(WebSocketDisconnect) as ended:
                ws.receive_text()
        assert ended.value.code == 1000


# WS /stream


def stream_events(
    client, audio: np.ndarray, query: str = "", size: int = 640, rate: int = SAMPLE_RATE
) -> list:
    events = []
    with client.websocket_connect(f"/stream{query}") as ws:
        for message in frames(audio, size):
            ws.send_bytes(message)
        ws.send_text(END)
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                events.append(ws.receive_json())
    return events


def test_stream_gives_the_events_of_detector_detect(client, model, long_recording):
    expected = [event.to_dict() for event in Detector(model).detect(long_recording)]
    assert len(expected) >= 4
    assert stream_events(client, long_recording) == expected  # 20 ms frames
    assert stream_events(client, long_recording, size=333) == expected  # samples split across messages


def test_stream_resamples_an_announced_rate(client, model, long_recording):
    expected = [event.to_dict() for event in Detector(model).detect(long_recording)]
    at_48k = pcm16(soxr.resample(long_recording, SAMPLE_RATE, 48_000))
    events = stream_events(client, at_48k, "?rate=48000", size=1920)
    assert [e["label"] for e in events] == [e["label"] for e in expected]
    np.testing.assert_allclose([e["end"] for e in events], [e["end"] for e in expected], atol=0.1)


def test_stream_takes_the_threshold_post_detect_takes(client, model, long_recording):
    config = detection_config(model.manifest, {"yes": 0.5, "no": 0.5})
    expected = [event.to_dict() for event in Detector(model, config).detect(long_recording)]
    calibrated = [event.to_dict() for event in Detector(model).detect(long_recording)]
    assert stream_events(client, long_recording, "?threshold=yes=0.5,no=0.5") == expected != calibrated
    with (
        client.websocket_connect("/stream?threshold=nope=0.5") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_text()
    assert closed.value.code == 1008 and closed.value.reason.startswith(
        "threshold: thresholds for nope, which"
    )


@pytest.mark.parametrize("rate", ["8000", "192000"])
def test_stream_takes_the_rates_at_either_end_of_its_range(client, rate):
    with client.websocket_connect(f"/stream?rate={rate}") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.send_bytes(np.zeros(int(rate) // 10, "<i2").tobytes())  # 0.1 s of silence
        ws.send_text(END)
        ws.receive_text()
    assert closed.value.code == 1000  # a stream that ended, not one refused


@pytest.mark.parametrize("rate", ["abc", "100", "7999", "192001", "1000000", "-16000", "16000.5"])
def test_stream_refuses_an_unsupported_rate(client, rate):
    with client.websocket_connect(f"/stream?rate={rate}") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    assert closed.value.code == 1008 and "8000 to 192000" in closed.value.reason


@pytest.mark.parametrize("query", ["sampleRate=48000", "rate=48000&format=f32le"])
def test_stream_refuses_a_parameter_it_does_not_read(client, query):
    # A misspelt rate would read 48 kHz audio as 16 kHz: no error, and no keyword ever found.
    with client.websocket_connect(f"/stream?{query}") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    unknown = query.split("&")[-1].split("=")[0]
    assert (closed.value.code, closed.value.reason) == (
        1008,
        f"unknown query parameter {unknown!r}: this endpoint reads rate, threshold, api_key",
    )


@pytest.mark.parametrize("text", ['{"event": "pause"}', "[" * 200_000])  # nested too deep to parse
def test_stream_refuses_text_other_than_end(client, text):
    with client.websocket_connect("/stream") as ws:
        ws.send_text(text)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1003


def test_the_stream_opened_over_plain_http_says_it_is_a_websocket(client):
    answer = client.get("/stream")
    assert answer.status_code == 426 and answer.headers["upgrade"] == "websocket"
    assert answer.json()["detail"].startswith("/stream is a WebSocket: connect to ws://HOST:PORT/stream")
    schema = client.get("/openapi.json").json()
    assert "/stream" not in schema["paths"]  # OpenAPI lists HTTP endpoints: its description has the stream
    assert 'then the text message `{"event": "end"}`' in schema["info"]["description"]


def test_the_openapi_schema_declares_every_error_body_and_the_api_key(client, export):
    responses = client.get("/openapi.json").json()["paths"]["/detect"]["post"]["responses"]
    errors = {
        status: answer for status, answer in responses.items() if status.startswith("4") or status == "503"
    }
    assert sorted(errors) == ["400", "401", "403", "408", "413", "415", "422", "503"]
    for answer in errors.values():
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert (
        "audio/mpeg"
        in client.get("/openapi.json").json()["paths"]["/detect"]["post"]["requestBody"]["content"]
    )
    assert "security" not in client.get("/openapi.json").json()  # no key, none to declare
    guarded = create_app(Settings(model=str(export), api_key=API_KEY)).openapi()
    assert guarded["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert guarded["paths"]["/health"]["get"]["security"] == []  # the one endpoint without a key
    # The parameters refused as unknown are none the endpoint reads.
    (detect,) = [route for route in routes.routes if getattr(route, "path", None) == "/detect"]
    assert DETECT_PARAMETERS == tuple(param.alias for param in detect.dependant.query_params)
    assert guarded["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }


# OpenAPI fuzzing


@pytest.fixture(scope="module")
def api_schema(export):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings(model=str(export))))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(api_schema, mode):
    statuses = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not (len(operation.query) or len(operation.body)):
            continue  # nothing to get wrong

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call()
            statuses.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"

        call()
    assert len(statuses) >= 40 and max(statuses) < 500


# A real `kws serve` process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], log: Path, env: dict | None = None, ignoring_hangups: bool = False):
    """Start a server command on a free 127.0.0.1 port; yield its URL once /health answers.
    ``ignoring_hangups``: started as nohup starts it."""
    port = free_port()
    clean = {name: value for name, value in os.environ.items() if not name.startswith("KWS_")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**clean, **(env or {})},
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignoring_hangups else None,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"server exited: {log.read_text()}"
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"server never answered: {log.read_text()}"
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    """``kws serve`` with an API key and a 1 MB body limit: (url, process, log file)."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    command = [sys.executable, "-m", "kws", "serve", "--model", str(export), "--max-bytes", "1000000"]
    with running(command, log, {"KWS_API_KEY": API_KEY}) as (url, process):
        yield url, process, log


KEY = {"X-API-Key": API_KEY}


def test_a_closed_terminal_stops_the_server_as_sigterm_does(export, tmp_path):
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "kws", "serve", "--model", str(export), "--workers", "1"]
    with running(command, log) as (_, process):
        process.send_signal(signal.SIGHUP)
        # uvicorn shuts down, then raises the SIGTERM it caught again, as after `docker stop`
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "Shutting down" in text and "Finished server process" in text and "Traceback" not in text
    with running(command, log, ignoring_hangups=True) as (url, process):  # `nohup kws serve &`
        process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert process.poll() is None and httpx2.get(f"{url}/health", timeout=5).status_code == 200


def test_real_server_answers_like_the_app(server, client, long_recording):
    url, _, _ = server
    data = encode(long_recording)
    assert httpx2.get(f"{url}/ready", headers=KEY).status_code == 200
    files = {"file": ("talk.wav", data, "audio/wav")}
    served = httpx2.post(f"{url}/detect?threshold=0.5", files=files, headers=KEY, timeout=30)
    assert served.status_code == 200
    assert served.json() == client.post("/detect?threshold=0.5", files=files).json()


def test_real_server_survives_the_malformed_corpus(server, client):
    url, process, _ = server
    with httpx2.Client(headers=KEY, timeout=30) as http:
        for name, (data, _) in CORPUS.items():
            served = http.post(f"{url}/detect", content=data)
            assert served.status_code == client.post("/detect", content=data).status_code, name
        assert http.get(f"{url}/health").status_code == 200 and process.poll() is None


def test_real_server_stops_reading_an_oversized_body(server):
    """413 long before a huge body has been sent: from Content-Length, and while a chunked body streams."""
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    announced = (
        f"POST /detect HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Length: {10**12}\r\n\r\n"
    )
    chunked = (
        f"POST /detect HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (100_000, b"\0" * 100_000)
    for head, chunks in ((announced, [b"RIFF"]), (chunked, [chunk] * 11)):  # 1.1 MB of a body that never ends
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(head.encode())
            with contextlib.suppress(ConnectionError):  # the server may hang up before the last chunks
                for piece in chunks:
                    connection.sendall(piece)
            assert connection.recv(100).startswith(b"HTTP/1.1 413")


def test_the_readmes_websocket_client_streams_what_detect_hears_in_a_file(
    server, model, long_recording, tmp_path, capsys
):
    url, _, _ = server
    example = readme_code("python", "ws://").replace(
        "ws://localhost:8000/stream?", url.replace("http", "ws") + f"/stream?api_key={API_KEY}&"
    )
    stereo = np.stack([long_recording, 0.5 * long_recording], axis=1)  # mixed, not the first channel
    for name, subtype in (("float.wav", "FLOAT"), ("pcm16.wav", "PCM_16")):  # floats read as floats
        sf.write(tmp_path / name, stereo, SAMPLE_RATE, subtype=subtype)
        exec(compile(example.replace('"talk.wav"', repr(str(tmp_path / name))), "README.md", "exec"), {})
        printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines()]
        # What kws detect hears in the file (mixed to mono), rounded to the 16 bits a stream carries.
        expected = Detector(model).detect(np.round(audio.load(tmp_path / name) * 32768) / 32768)
        assert printed == [event.to_dict() for event in expected] and len(expected) >= 3


@pytest.mark.parametrize(
    "path, logged",
    [
        ("/stream?api_key=s3cr3t", "/stream?api_key=***"),
        ("/stream?rate=8000&api%5Fkey=s3cr3t%2Bk%3Dy&x=1", "/stream?rate=8000&api%5Fkey=***&x=1"),
        ("/stream?%61pi_key=s3cr3t", "/stream?%61pi_key=***"),
        ("/stream?API_KEY=s3cr3t", "/stream?API_KEY=***"),
        ("/stream?my_api_key=s3cr3t&api_keys=1", "/stream?my_api_key=s3cr3t&api_keys=1"),
    ],
)
def test_the_log_filter_blanks_api_keys_under_any_spelling_of_their_name(path, logged):
    from kws.server import REDACT_API_KEY

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "WebSocket %s" %s', ("c", path, 1), None
    )
    assert REDACT_API_KEY.filter(record) and record.args == ("c", logged, 1)


def test_real_server_refuses_oversized_headers_before_holding_them(server):
    from kws.server import MAX_HEADER_BYTES

    url, process, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: ")
        with contextlib.suppress(ConnectionError):  # the server hangs up before the last megabytes
            for _ in range(64):  # 64 MB of a header that never ends
                connection.sendall(b"a" * (1 << 20))
        assert connection.recv(100).startswith(b"HTTP/1.1 400")
    padding = {"X-Padding": "a" * (MAX_HEADER_BYTES // 2)}
    assert httpx2.get(f"{url}/health", headers=padding).status_code == 200 and process.poll() is None


def test_real_server_streams_and_keeps_the_key_out_of_its_log(server, model, long_recording):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url, _, log = server
    events = []
    with connect(f"{url.replace('http', 'ws')}/stream?api_key={API_KEY}") as ws:
        for message in frames(long_recording, 640):
            ws.send(message)
        ws.send(END)
        events = [json.loads(message) for message in ws]
    assert events == [event.to_dict() for event in Detector(model).detect(long_recording)]
    # A message over the size limit closes the stream rather than hold the other streams up,
    # with its reason (a client's compression, on by default, neither counts nor loses it).
    noise = np.random.default_rng(3).bytes(WS_MAX_BYTES + 2)
    with connect(f"{url.replace('http', 'ws')}/stream?api_key={API_KEY}", max_size=None) as ws:
        ws.send(noise[:-2])  # up to the limit: scored
        ws.send(noise)
        with pytest.raises(ConnectionClosed) as too_big:
            ws.recv(timeout=10)
    assert (too_big.value.rcvd.code, too_big.value.rcvd.reason) == (1009, "a message holds at most 256 KiB")
    with connect(f"{url.replace('http', 'ws')}/stream?api_key=wrong") as ws:
        with pytest.raises(ConnectionClosed) as refused:
            ws.recv()
    assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (1008, "missing or wrong API key")
    assert httpx2.get(f"{url}/model", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx2.get(f"{url}/model?api_key={API_KEY}").status_code == 401
    time.sleep(0.5)  # let the access log reach the file
    text = log.read_text()
    assert "/stream?api_key=***" in text and '"GET /model HTTP/1.1" 200' in text
    assert API_KEY not in text


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_a_port_outside_1_to_65535_is_refused_not_wrapped(port, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", port])
    assert exited.value.code == 2 and f"must be from 1 to 65535, got {port}" in capsys.readouterr().err


def test_an_api_key_must_be_printable_ascii(capsys, monkeypatch):
    monkeypatch.setenv("KWS_API_KEY", "clé-1")
    assert main(["serve"]) == 2
    message = "KWS_API_KEY must be printable ASCII: clients send it in an HTTP header"
    assert capsys.readouterr().err == f"kws serve: error: {message}\n"


@pytest.mark.parametrize("key", ["secret ", " secret", " "])
def test_an_api_key_with_a_space_at_either_end_is_refused_as_no_client_could_send_it(
    key, capsys, monkeypatch
):
    monkeypatch.setenv("KWS_API_KEY", key)
    monkeypatch.setattr("kws.server.serve", lambda *args: pytest.fail(f"KWS_API_KEY={key!r} was taken"))
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("kws serve: error: KWS_API_KEY starts or ends with a space")


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max-seconds", "0", "a positive number of seconds"),
        ("--max-seconds", "nan", "a positive number of seconds"),
        ("--max-seconds", "inf", "a positive number of seconds"),
        ("--max-bytes", "1e6", "a whole number, at least 1"),
        ("--workers", "0", "a whole number, at least 1"),
        ("--workers", "1.5", "a whole number, at least 1"),
        ("--port", "0", "from 1 to 65535"),
    ],
)
def test_a_limit_is_refused_in_the_same_words_as_option_or_variable(
    flag, value, expected, capsys, monkeypatch
):
    with pytest.raises(SystemExit) as exited:
        main(["serve", flag, value])
    assert exited.value.code == 2 and f"{flag}: must be {expected}, got {value}\n" in capsys.readouterr().err
    variable = "KWS_" + flag.removeprefix("--").replace("-", "_").upper()
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr("kws.server.serve", lambda *args: pytest.fail(f"{variable}={value} was taken"))
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == f"kws serve: error: {variable} must be {expected}, got {value}\n"


PAGE = "http://homeassistant.local:8123"


def test_pages_of_allowed_origins_may_call_the_api_and_open_streams(export):
    with fresh_client(export, api_key=API_KEY, cors_origins=(PAGE,)) as client:
        # A browser's preflight carries no key: it is answered before the key is asked for.
        preflight = client.options(
            "/detect",
            headers={
                "Origin": PAGE,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == PAGE
        answer = client.get("/model", headers={"Origin": PAGE, "X-API-Key": API_KEY})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE
        other = client.get("/model", headers={"Origin": "http://evil.example", "X-API-Key": API_KEY})
        assert "access-control-allow-origin" not in other.headers  # the browser keeps the answer from it
        # This server's own host too: it gives no page that streams, and a name can be rebound to it.
        for origin, code in ((PAGE, 1000), ("http://evil.example", 1008), ("http://testserver", 1008)):
            with (
                client.websocket_connect(f"/stream?api_key={API_KEY}", headers={"Origin": origin}) as ws,
                pytest.raises(WebSocketDisconnect) as closed,
            ):
                ws.send_text(END)
                ws.receive_text()
            assert closed.value.code == code
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/stream") as ws:
            ws.receive_text()  # no key
        samples = metric_samples(client.get("/metrics", headers={"X-API-Key": API_KEY}).text)
    assert samples[("kws_streams_refused_total", (("reason", "origin"),))] == 2
    assert samples[("kws_streams_refused_total", (("reason", "api_key"),))] == 1
    with fresh_client(export, cors_origins=("*",)) as client:
        with (
            client.websocket_connect("/stream", headers={"Origin": "http://evil.example"}) as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.send_text(END)
            ws.receive_text()
        assert closed.value.code == 1000  # "*": any page


def test_without_allowed_origins_other_sites_pages_cannot_call_the_api_or_open_streams(client, clip):
    # A page may post a "simple" request to any address without asking first: the answer is 403.
    body = encode(clip)
    posted = client.post("/detect", content=body, headers={"Origin": PAGE, "Content-Type": "text/plain"})
    assert (posted.status_code, posted.json()) == (
        403,
        {"detail": f"origin {PAGE} not allowed: kws serve --cors-origin {PAGE}"},
    )
    assert client.get("/model", headers={"Origin": PAGE}).status_code == 403
    for host, origin, status in (
        ("127.0.0.1:8000", "http://127.0.0.1:8000", 200),  # its /docs, at an address
        ("localhost:8000", "http://localhost:8000", 200),
        ("[::1]:8000", "http://[::1]:8000", 200),
        ("127.0.0.1:8000", "https://127.0.0.1:8000", 403),  # another scheme: another origin
        ("evil.example:8000", "http://evil.example:8000", 403),  # a site's name, rebound to the server
        ("evil.example:8000", None, 200),  # no origin: no browser
    ):
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        answer = client.post("/detect", content=body, headers=headers)
        assert answer.status_code == status
        if status == 200:
            assert [event["label"] for event in answer.json()["detections"]] == ["up"]
    with (
        client.websocket_connect("/stream", headers={"Origin": "null"}) as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_text()  # a page opened from a file
    assert closed.value.reason == "origin null not allowed: serve the page over http"
    with (
        client.websocket_connect("/stream", headers={"Origin": PAGE}) as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_text()
    assert (closed.value.code, closed.value.reason) == (
        1008,
        f"origin {PAGE} not allowed: kws serve --cors-origin {PAGE}",
    )


def test_allowed_origins_come_from_the_option_or_kws_cors_origins(monkeypatch, capsys):
    served = []
    monkeypatch.setattr("kws.server.serve", lambda settings, host, port: served.append(settings.cors_origins))
    monkeypatch.setattr("kws.cli._check_can_listen", lambda host, port: None)
    monkeypatch.setenv("KWS_CORS_ORIGINS", f"{PAGE}/, http://other.local")  # a slash at the end, as copied
    assert main(["serve"]) == 0
    assert main(["serve", "--cors-origin", "*", "--cors-origin", "https://a.example,https://a.example"]) == 0
    # As a browser sends them: lower case, no default port (else no page would ever match).
    assert main(["serve", "--cors-origin", "HTTP://HA.Local:80,https://x.example:443,http://[::1]:8080"]) == 0
    assert served == [
        (PAGE, "http://other.local"),
        ("*", "https://a.example"),
        ("http://ha.local", "https://x.example", "http://[::1]:8080"),
    ]
    for bad in (f"{PAGE}/lovelace", "null", "ha.local:8123"):
        with pytest.raises(SystemExit):
            main(["serve", "--cors-origin", bad])
        assert "must be origins such as http://homeassistant.local:8123" in capsys.readouterr().err


def test_serve_takes_its_port_from_kws_port_unless_given_one(monkeypatch):
    served, checked = [], []
    monkeypatch.setattr("kws.server.serve", lambda settings, host, port: served.append(port))
    monkeypatch.setattr("kws.cli._check_can_listen", lambda host, port: checked.append(port))
    monkeypatch.setenv("KWS_PORT", "9001")
    assert main(["serve"]) == 0 and main(["serve", "--port", "9002"]) == 0
    monkeypatch.delenv("KWS_PORT")
    assert main(["serve"]) == 0
    assert served == checked == [9001, 9002, 8000]


def test_serve_help_states_the_settings_defaults(capsys):
    from kws.server import DEFAULT_MAX_BYTES, DEFAULT_MAX_SECONDS

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"largest request body, in bytes (default {DEFAULT_MAX_BYTES:,})" in text
    assert f"longest recording POST /detect takes, in seconds (default {DEFAULT_MAX_SECONDS:g})" in text


def test_serve_resolves_the_model_once_for_the_server_and_its_workers(export, tmp_path, monkeypatch, capsys):
    from kws.runtime import CONFIG_FILE, EXPORT_FOLDER, MODEL_FILE

    run = tmp_path / "run"  # a run trained on after its export: loading it warns
    shutil.copytree(export, run / EXPORT_FOLDER)
    (run / CONFIG_FILE).write_text("{}")
    (run / MODEL_FILE).write_bytes(b"newer than the export")
    served = []
    monkeypatch.setattr("kws.server.serve", lambda settings, host, port: served.append(settings))
    assert main(["serve", "--model", str(run), "--port", str(free_port())]) == 0
    assert served[0].model == str(run / EXPORT_FOLDER / "model_int8.tflite")  # what every process loads
    assert capsys.readouterr().err.count("warning:") == 1


def test_a_request_cancelled_after_its_answer_began_is_not_answered_again():
    sent = []

    async def answering_slowly(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def shutdown_cancels() -> bool:
        request = asyncio.ensure_future(AnswerAtShutdown(answering_slowly)(detect_scope(b""), None, send))
        await asyncio.sleep(0.1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        return request.cancelled()

    assert asyncio.run(shutdown_cancels())  # the cancellation goes on to uvicorn
    assert [message["type"] for message in sent] == ["http.response.start"]


def test_an_address_it_cannot_listen_on_is_a_one_line_error_before_the_workers_start(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "max 100000\n"}, 64),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 64),
        ({}, 64),
    ],
)
def test_default_workers_follow_a_containers_cpu_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert default_workers(tmp_path) == expected


def test_worker_processes_answer_like_the_detector_and_a_killed_one_is_replaced(model, clip):
    data = encode(clip)
    expected = recording_report(Detector(model), [clip], "c.wav")

    async def scenario():
        pool = WorkerPool(model, 2)
        try:
            pids = await pool.start()
            assert len(pids) == 2
            answers = await asyncio.gather(*(pool.detect(data, "c.wav", 60.0, None, None) for _ in range(4)))
            assert answers == [expected] * 4
            # A SIGTERM to the process group reaches the workers: they leave stopping to the server.
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert {worker.pid for worker in pool._workers} == pids
            os.kill(pids.pop(), signal.SIGKILL)
            await asyncio.sleep(0.5)
            assert await pool.detect(data, "c.wav", 60.0, None, None) == expected
            with pytest.raises(RequestError) as refused:
                await pool.detect(b"RIFF", "c.wav", 60.0, None, None)
            assert refused.value.status == 415 and "c.wav" in refused.value.detail
            for _ in range(100):  # the replacement starts in the background
                if len(pool._workers) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(pool._workers) == 2 and pids < {worker.pid for worker in pool._workers}
        finally:
            await pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_request_given_up_still_gets_its_answer_read_before_the_next(model, clip):
    """A cancelled request's answer must not reach the request after it on the same worker."""
    rng = np.random.default_rng(3)
    long = pcm16(0.1 * rng.standard_normal(40 * SAMPLE_RATE))
    expected = recording_report(Detector(model), [clip], "c.wav")

    async def scenario():
        pool = WorkerPool(model, 1)
        try:
            (pid,) = await pool.start()
            given_up = asyncio.ensure_future(pool.detect(encode(long), "long.wav", 60.0, None, None))
            await asyncio.sleep(0.02)
            given_up.cancel()
            answer = await pool.detect(encode(clip), "c.wav", 60.0, None, None)
            return pid, answer, {worker.pid for worker in pool._workers}
        finally:
            await pool.close()

    pid, answer, running = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert answer == expected and running == {pid}


def test_a_request_goes_to_an_idle_worker_not_behind_a_busy_one(model, clip):
    rng = np.random.default_rng(4)
    long = encode(pcm16(0.1 * rng.standard_normal(59 * SAMPLE_RATE)))
    finished = []

    async def timed(data: bytes, name: str) -> None:
        await pool.detect(data, name, 60.0, None, None)
        finished.append(name)

    async def scenario():
        await pool.start()
        try:
            await asyncio.gather(timed(long, "long"), timed(encode(clip), "short"))
        finally:
            await pool.close()

    pool = WorkerPool(model, 2)
    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert finished == ["short", "long"]


def test_without_a_worker_that_can_start_requests_and_ready_get_503_until_one_can(export, clip, monkeypatch):
    monkeypatch.setattr(workers, "RESTART_DELAY_S", 0.2)
    data = encode(clip)

    def wait_for(client, status: int) -> None:
        for _ in range(300):
            if client.get("/ready").status_code == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"/ready never said {status}")

    start = workers._Worker.start

    async def start_unless_broken(context, model):
        if broken:
            raise RuntimeError("a worker process exited while loading its model")
        return await start(context, model)

    broken = False
    monkeypatch.setattr(workers._Worker, "start", staticmethod(start_unless_broken))
    with TestClient(create_app(Settings(model=str(export), workers=1))) as client:
        pool = client.app.state.workers
        assert client.post("/detect", content=data).status_code == 200
        broken = True
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGKILL)
        wait_for(client, 503)
        refused = client.post("/detect", content=data)
        assert refused.status_code == 503 and refused.json()["detail"] == workers.NO_WORKER
        broken = False
        wait_for(client, 200)
        assert client.post("/detect", content=data).status_code == 200


def test_a_replacement_process_runs_the_model_the_server_loaded_not_a_newer_export(export, clip, tmp_path):
    served = tmp_path / "export"
    shutil.copytree(export, served)
    data = encode(clip)
    with fresh_client(served, workers=1) as client:
        before = client.post("/detect", content=data).json()
        for built_in in BUILT_IN_MODEL.iterdir():  # the folder exported again while it serves
            shutil.copy(built_in, served / built_in.name)
        pool = client.app.state.workers
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGKILL)
        asyncio.run(replaced(pool, worker))
        after = client.post("/detect", content=data).json()
        labels = client.get("/model").json()["labels"]
    assert before["detections"] and after == before
    assert labels == Model.load(export).labels != Model.load(served).labels


def detect_scope(body: bytes) -> dict:
    """The ASGI scope of a POST /detect of ``body`` as a WAV file."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/detect",
        "raw_path": b"/detect",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"audio/wav"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


class Busy:
    """A pool whose processes are all taken: a request waits in its queue; ``withdrawn`` lists
    the requests cancelled there."""

    def __init__(self):
        self.withdrawn = []

    async def detect(self, *args):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.withdrawn.append(args[1])
            raise


class Upload:
    """One POST /detect of ``body`` over raw ASGI, its messages kept in ``sent``; its client hangs
    up ``leaves_after`` seconds after sending it, or (None) waits for the answer."""

    def __init__(self, body: bytes, leaves_after: float | None):
        self.body, self.leaves_after, self.sent = body, leaves_after, []
        self.unsent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive(self):
        if self.unsent:
            return self.unsent.pop(0)
        await asyncio.sleep(3600 if self.leaves_after is None else self.leaves_after)
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    def to(self, app):
        return app(detect_scope(self.body), self.receive, self.send)


@contextlib.contextmanager
def busy_app(export):
    """The app, started, with a Busy pool in place of its worker processes: (client, pool)."""
    busy = Busy()
    with TestClient(create_app(Settings(model=str(export), workers=1))) as client:
        pool, client.app.state.workers = client.app.state.workers, busy
        try:
            yield client, busy
        finally:
            client.app.state.workers = pool


def test_a_request_whose_client_hangs_up_is_withdrawn_from_the_queue(export, clip):
    upload = Upload(encode(clip), leaves_after=0.1)  # while the request waits, its client hangs up
    with busy_app(export) as (client, busy):
        asyncio.run(asyncio.wait_for(upload.to(client.app), 10))
        counted = metric_samples(client.get("/metrics").text)
    assert busy.withdrawn == ["upload"]  # cancelled: it never reaches a worker process
    assert (
        upload.sent[0]["type"] == "http.response.start" and upload.sent[0]["status"] == 499
    )  # read by nobody
    assert (
        counted[("kws_requests_total", (("endpoint", "/detect"), ("status", "499")))] == 1
    )  # not a bad request


def test_a_request_running_when_the_graceful_shutdown_ends_gets_503_not_500(export, clip):
    upload = Upload(encode(clip), leaves_after=None)

    async def shutdown_cancels(app) -> bool:
        request = asyncio.ensure_future(upload.to(app))
        await asyncio.sleep(0.2)  # queued for a worker process
        request.cancel("Task cancelled, timeout graceful shutdown exceeded")  # uvicorn's words
        await request
        return request.cancelled()

    with busy_app(export) as (client, busy):
        cancelled = asyncio.run(asyncio.wait_for(shutdown_cancels(client.app), 10))
        counted = metric_samples(client.get("/metrics").text)
    assert busy.withdrawn == ["upload"] and not cancelled
    assert upload.sent[0]["type"] == "http.response.start" and upload.sent[0]["status"] == 503
    assert json.loads(upload.sent[1]["body"]) == {"detail": workers.SHUTTING_DOWN}
    assert counted[("kws_requests_total", (("endpoint", "/detect"), ("status", "503")))] == 1


def pool_scenario(model, size: int, scenario, timeout: float = 120.0):
    """``scenario(pool)`` with a started pool of ``size`` processes, closed after it."""

    async def run():
        pool = WorkerPool(model, size)
        await pool.start()
        try:
            return await scenario(pool)
        finally:
            await pool.close()

    return asyncio.run(asyncio.wait_for(run(), timeout))


async def replaced(pool, dead) -> None:
    """Wait until the pool runs a process in place of ``dead`` (a killed worker)."""
    for _ in range(200):  # a replacement starts in the background
        if dead not in pool._workers and len(pool._workers) == pool.size:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no replacement process started")


def test_a_request_its_process_died_on_gets_503_and_the_one_behind_it_an_answer(model, clip):
    # 10 minutes: long enough (~0.8 s) to be killed while running.
    long = encode(pcm16(0.1 * np.random.default_rng(5).standard_normal(600 * SAMPLE_RATE)))
    expected = recording_report(Detector(model), [clip], "c.wav")

    async def scenario(pool):
        (worker,) = pool._workers
        running = asyncio.ensure_future(pool.detect(long, "long.wav", 700.0, None, None))
        behind = asyncio.ensure_future(pool.detect(encode(clip), "c.wav", 60.0, None, None))
        await asyncio.sleep(0.3)  # both handed to the one process, which works on the first
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(RequestError) as died:
            await running
        return died.value, await behind

    died, answer = pool_scenario(model, 1, scenario)
    assert (died.status, died.detail) == (503, "the worker process died running this request: try again")
    assert answer == expected  # retried in the replacement, as it may not be what killed the first


def test_a_stuck_process_is_killed_and_replaced_and_its_request_gets_503(model, clip, monkeypatch):
    monkeypatch.setattr(workers, "STUCK_AFTER_S", 0.5)

    async def scenario(pool):
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGSTOP)  # as a process in an endless loop, or swapped out
        began = time.monotonic()
        with pytest.raises(RequestError) as stuck:
            await pool.detect(encode(clip), "c.wav", 1.0, None, None)  # stuck after 0.5 + 2 x 1 s
        waited = time.monotonic() - began
        await replaced(pool, worker)
        return (
            stuck.value,
            waited,
            worker.process.exitcode,
            await pool.detect(encode(clip), "c.wav", 1.0, None, None),
        )

    stuck, waited, exitcode, answer = pool_scenario(model, 1, scenario)
    assert stuck.status == 503 and "stuck" in stuck.detail and 2.5 <= waited < 10
    assert exitcode == -signal.SIGKILL and answer["file"] == "c.wav"


def test_a_process_stuck_on_a_request_its_client_gave_up_is_still_killed(model, clip, monkeypatch):
    monkeypatch.setattr(workers, "STUCK_AFTER_S", 0.5)

    async def scenario(pool):
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGSTOP)
        given_up = asyncio.ensure_future(pool.detect(encode(clip), "c.wav", 1.0, None, None))
        await asyncio.sleep(0.2)
        given_up.cancel()  # a client's timeout, shorter than the 2.5 s the process is given
        await replaced(pool, worker)
        return worker.process.exitcode, await pool.detect(encode(clip), "c.wav", 1.0, None, None)

    exitcode, answer = pool_scenario(model, 1, scenario, timeout=30)
    assert exitcode == -signal.SIGKILL and answer["file"] == "c.wav"


def test_failed_requests_leave_no_body_behind_for_the_garbage_collector(model):
    async def scenario(pool):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(8):
                with pytest.raises(RequestError):  # 415: not audio
                    await pool.detect(os.urandom(4_000_000), "noise.wav", 60.0, None, None)
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    gc.disable()  # the body must be freed when the request ends, not when a collection runs
    try:
        kept = pool_scenario(model, 1, scenario)
    finally:
        gc.enable()
    assert kept < 8_000_000  # the 8 bodies and their pickles would be 64 MB


def test_replacing_processes_leaks_no_file_descriptors_and_survives_a_failed_spawn(model, clip, monkeypatch):
    monkeypatch.setattr(workers, "RESTART_DELAY_S", 0.2)
    start, failures = workers._Worker.start, []

    async def out_of_descriptors_once(context, model):
        if not failures:
            failures.append(1)
            raise OSError(24, "Too many open files")
        return await start(context, model)

    async def replace_one(pool) -> None:
        (worker,) = pool._workers
        os.kill(worker.pid, signal.SIGKILL)
        await replaced(pool, worker)

    async def scenario(pool):
        await replace_one(pool)  # the first replacement opens what every later one reuses
        descriptors = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            await replace_one(pool)
        monkeypatch.setattr(workers._Worker, "start", staticmethod(out_of_descriptors_once))
        await replace_one(pool)  # the restart goes on after an OSError
        answer = await pool.detect(encode(clip), "c.wav", 60.0, None, None)
        for _ in range(40):  # a dead process's pipes close as the event loop gets to them (slow under load)
            if len(os.listdir("/proc/self/fd")) <= descriptors:
                break
            await asyncio.sleep(0.05)
        return descriptors, len(os.listdir("/proc/self/fd")), answer, failures

    before, after, answer, failures = pool_scenario(model, 1, scenario)
    assert failures == [1] and answer["file"] == "c.wav"
    assert after == before  # each dead process's pipes are closed


def test_requests_given_up_while_queued_leave_the_process_free_for_the_next(model, clip):
    long = encode(pcm16(0.1 * np.random.default_rng(7).standard_normal(300 * SAMPLE_RATE)))

    async def scenario(pool):
        (worker,) = pool._workers
        running = [asyncio.ensure_future(pool.detect(long, "long.wav", 400.0, None, None)) for _ in range(2)]
        await asyncio.sleep(0.05)  # the process holds both: the next ones queue
        queued = [
            asyncio.ensure_future(pool.detect(encode(clip), "c.wav", 60.0, None, None)) for _ in range(3)
        ]
        await asyncio.sleep(0.05)
        for request in queued:  # their clients gave up (a proxy's timeout)
            request.cancel()
        later = [pool.detect(encode(clip), "c.wav", 60.0, None, None) for _ in range(4)]
        answers = await asyncio.gather(*running, *later)
        return answers, worker.busy, [request.cancelled() for request in queued]

    answers, busy, cancelled = pool_scenario(model, 1, scenario)
    assert [answer["file"] for answer in answers] == ["long.wav"] * 2 + ["c.wav"] * 4
    assert busy == 0 and cancelled == [True] * 3


def test_requests_beyond_those_that_may_wait_get_503_busy_at_once(model, clip, monkeypatch):
    monkeypatch.setattr(workers, "WAITING_PER_WORKER", 2)
    long = encode(pcm16(0.1 * np.random.default_rng(8).standard_normal(300 * SAMPLE_RATE)))

    async def scenario(pool):
        running = [asyncio.ensure_future(pool.detect(long, "long.wav", 400.0, None, None)) for _ in range(2)]
        await asyncio.sleep(0.05)  # the process holds both: the next two wait
        waiting = [
            asyncio.ensure_future(pool.detect(encode(clip), f"w{i}.wav", 60.0, None, None)) for i in range(2)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as refused:
            await pool.detect(encode(clip), "third.wav", 60.0, None, None)
        waiting[0].cancel()  # its client gave up: its place is free again
        await asyncio.sleep(0.05)
        waiting.append(asyncio.ensure_future(pool.detect(encode(clip), "w2.wav", 60.0, None, None)))
        answers = await asyncio.gather(*running, *waiting[1:])
        return refused.value, [answer["file"] for answer in answers]

    refused, answered = pool_scenario(model, 1, scenario)
    assert (refused.status, refused.detail) == (
        503,
        "busy: 2 requests wait for the 1 worker process; try again",
    )
    assert answered == ["long.wav", "long.wav", "w1.wav", "w2.wav"]


def test_closing_lets_a_busy_process_finish_and_refuses_what_waits(model):
    long = pcm16(0.1 * np.random.default_rng(6).standard_normal(600 * SAMPLE_RATE))  # ~0.8 s of work
    expected = recording_report(Detector(model), [long], "long.wav")

    async def scenario():
        pool = WorkerPool(model, 1)
        await pool.start()
        (worker,) = pool._workers
        requests = [
            asyncio.ensure_future(pool.detect(encode(long), "long.wav", 700.0, None, None)) for _ in range(3)
        ]
        await asyncio.sleep(0.05)  # two handed to the process, the third waiting
        await pool.close()
        results = await asyncio.gather(*requests, return_exceptions=True)
        return results, worker.process.exitcode

    results, exitcode = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert results[:2] == [expected, expected] and exitcode == 0  # answered, not killed
    assert isinstance(results[2], RequestError) and results[2].status == 503
    assert results[2].detail == workers.SHUTTING_DOWN


# The Dockerfile


def dockerfile_lines() -> list[tuple[str, str]]:
    """The Dockerfile's instructions in order: (INSTRUCTION, its arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    split = (line.strip().partition(" ") for line in text.splitlines())
    return [(word.upper(), rest.strip()) for word, _, rest in split if word and not word.startswith("#")]


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per line."""
    parsed: dict[str, list[str]] = {}
    for instruction, arguments in dockerfile_lines():
        parsed.setdefault(instruction, []).append(arguments)
    return parsed


def test_dockerfile_cmd_serves_the_built_in_model(tmp_path):
    docker = dockerfile()
    command = json.loads(docker["CMD"][-1])
    assert command == ["kws", "serve", "--host", "0.0.0.0"] and docker["EXPOSE"] == ["8000"]
    assert docker["ENV"][-1] == "KWS_PORT=8000"
    assert docker["USER"][-1] not in ("root", "0")
    healthcheck = json.loads(docker["HEALTHCHECK"][-1].partition(" CMD ")[2])
    executable = shutil.which(command[0], path=str(Path(sys.executable).parent))
    # The image's command as it is (no --model): the model built into the package.
    with running([executable, *command[1:]], tmp_path / "serve.log") as (url, _):
        assert httpx2.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx2.get(f"{url}/ready").status_code == 200
        built_in = json.loads((REPO / "kws" / "models" / "default" / "manifest.json").read_text())
        assert httpx2.get(f"{url}/model").json()["name"] == built_in["name"]
        probe = [sys.executable if part == "python" else part for part in healthcheck]
        env = {**os.environ, "KWS_PORT": url.rpartition(":")[2]}  # as the image sets it
        assert subprocess.run(probe, env=env, timeout=30).returncode == 0
        env["KWS_PORT"] = str(free_port())  # nothing there: the check must fail
        assert subprocess.run(probe, env=env, timeout=30, stderr=subprocess.DEVNULL).returncode != 0


@pytest.mark.integration
def test_dockerfile_install_works_without_tensorflow(tmp_path):
    """The image's COPY and RUN lines up to its user, replayed in order into a fresh venv, the
    image's / under tmp_path (downloads ~100 MB once)."""
    root = tmp_path / "image"
    (root / "tmp").mkdir(parents=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PIP_QUIET": "1"}
    for instruction, arguments in dockerfile_lines():
        if instruction == "COPY":
            *sources, target = arguments.split()
            for source in sources:
                destination = root / target.lstrip("/")
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, destination)
        elif instruction == "RUN" and not arguments.startswith("useradd"):
            # Only the image's own install steps run here, never an apt-get on this machine.
            programs = {step.split()[0] for step in arguments.split("&&")}
            assert programs <= {"python", "pip", "rm"}, f"teach this test to replay RUN {arguments}"
            command = re.sub(r"(?<![\w.])/(src|tmp)\b", lambda found: str(root / found[1]), arguments)
            subprocess.run(["sh", "-c", command], env=env, check=True, timeout=1200)  # as docker runs RUN
        elif instruction == "USER":
            break
    assert not (root / "src").exists()  # the image keeps no source: kws runs as installed
    packages = subprocess.run(
        [str(venv / "bin" / "pip"), "list"], capture_output=True, text=True
    ).stdout.lower()
    assert "fastapi" in packages and "ai-edge-litert" in packages and "tensorflow" not in packages
    check = (
        "import sys, kws.server, kws.cli, soundfile; from kws.runtime import Model; Model.load(None); "
        "assert 'tensorflow' not in sys.modules; print('ok')"
    )
    assert (
        subprocess.run([str(venv / "bin" / "python"), "-c", check], capture_output=True, text=True).stdout
        == "ok\n"
    )


def test_uploads_beyond_the_bytes_held_get_503_before_their_body_is_read(export, clip):
    body = encode(clip)
    first, second, third = (Upload(body, leaves_after=None) for _ in range(3))
    huge = Upload(bytes(Settings().max_bytes + 1), leaves_after=None)

    async def scenario(app) -> int:
        app.state.uploads = UploadBudget(2 * len(body))  # room for two uploads of this size
        held = [asyncio.ensure_future(upload.to(app)) for upload in (first, second)]
        await asyncio.sleep(0.2)  # both wait for a worker process
        await third.to(app)
        assert third.unsent  # refused before its body was read
        await huge.to(app)  # too large at any time: 413, not "busy, try again"
        for request in held:
            request.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        return app.state.uploads.held

    with busy_app(export) as (client, busy):
        held_after = asyncio.run(asyncio.wait_for(scenario(client.app), 10))
    assert third.sent[0]["status"] == 503 and huge.sent[0]["status"] == 413 and huge.unsent
    detail = json.loads(third.sent[1]["body"])["detail"]
    assert detail == f"busy: {2 * len(body):,} bytes of other uploads are held; try again"
    assert busy.withdrawn == ["upload", "upload"] and held_after == 0  # the bytes held are let go


def test_a_worker_whose_server_dies_mid_request_ends_quietly(model, monkeypatch, capsys):
    import threading

    monkeypatch.setattr(workers.signal, "signal", lambda *args: None)  # a thread may not set them
    server_end, worker_end = socket.socketpair()
    failures = []
    done = threading.Thread(
        target=lambda: failures.append(workers._serve(worker_end, model.content, model.manifest, "m")),
        daemon=True,
    )
    done.start()
    with server_end, server_end.makefile("rb") as answers:
        size = workers.LENGTH.unpack(answers.read(workers.LENGTH.size))[0]
        assert pickle.loads(answers.read(size)) == workers.READY
        server_end.sendall(workers.LENGTH.pack(1000) + b"\x80\x05 only part")  # then the server is gone
    done.join(timeout=30)
    assert not done.is_alive() and failures == [None]


def test_a_stream_beyond_the_most_served_is_refused_and_its_place_freed(client, monkeypatch):
    monkeypatch.setattr("kws.server.MAX_STREAMS", 1)
    with client.websocket_connect("/stream") as first:
        first.send_bytes(bytes(640))
        with client.websocket_connect("/stream") as second, pytest.raises(WebSocketDisconnect) as refused:
            second.receive_text()
        assert refused.value.code == 1013 and refused.value.reason.startswith("busy: 1 streams are open")
        first.send_text(END)
        with pytest.raises(WebSocketDisconnect):
            first.receive_text()
    with client.websocket_connect("/stream") as third, pytest.raises(WebSocketDisconnect) as ended:
        third.send_text(END)
        third.receive_text()
    assert ended.value.code == 1000  # served: the first one's place is free again


def test_a_body_that_stalls_gets_408_and_lets_its_bytes_go(export, clip, monkeypatch):
    monkeypatch.setattr("kws.server.IDLE_SECONDS", 0.2)
    body = encode(clip)
    held = []

    class Stalled(Upload):
        async def receive(self):
            if not self.unsent:  # the body stalls here, its first 1,000 bytes held
                held.append(client.app.state.uploads.held)
            return await super().receive()

    stalled = Stalled(body, leaves_after=None)
    # The first 1,000 bytes, and the rest never comes.
    stalled.unsent = [{"type": "http.request", "body": body[:1000], "more_body": True}]
    with busy_app(export) as (client, busy):
        asyncio.run(asyncio.wait_for(stalled.to(client.app), 10))
        held.append(client.app.state.uploads.held)
    assert stalled.sent[0]["status"] == 408 and held == [1000, 0] and busy.withdrawn == []
    assert (b"connection", b"close") in stalled.sent[0]["headers"]  # what came next is no request
    detail = json.loads(stalled.sent[1]["body"])["detail"]
    assert detail == "the body stalled: nothing of it arrived for 0.2 s after 1,000 bytes; send it again"


def test_a_stream_clock_closes_a_stream_sent_too_slowly_judging_each_window_on_its_own():
    live = StreamClock()  # real time, sent as recorded
    assert not any(live.heard(0.02, now=5.0 + 0.02 * i, waited=0.02) for i in range(20_000))
    assert live.due == pytest.approx(5.0 + 0.02 * 19_999 - CATCH_UP_S + 0.02)
    # A client that loses 40 % of its audio for five minutes: each window holds over half of its
    # time, and none is held against the next.
    lossy = StreamClock()
    assert not any(
        lossy.heard(0.012, now=0.02 * i, waited=0.02) for i in range(5 * round(STREAM_WINDOW_S / 0.02))
    )
    # A server busy with other streams reads a live stream's messages late: its time, not the client's.
    busy = StreamClock()
    assert not any(busy.heard(0.02, now=0.5 * i, waited=0.001) for i in range(1000))
    trickle = StreamClock()  # 2 bytes every 25 s, to keep a place
    assert (
        trickle.heard(1e-4, now=0.0, waited=0.0) is None
        and trickle.heard(1e-4, now=25.0, waited=25.0) is None
    )
    assert trickle.heard(1e-4, now=75.0, waited=50.0) == (
        "only 0 s of audio in 75 s: send it as it is recorded, at the ?rate= given"
    )
    fast = StreamClock()  # a recording sent as fast as it goes, 16 s a message: due ever later
    fast.heard(16.0, now=0.0, waited=0.0)
    assert fast.heard(16.0, now=0.1, waited=0.0) is None and fast.due == pytest.approx(32.0 - CATCH_UP_S)
    slow = StreamClock()  # half real time for an hour: behind by 30 min, but first by CATCH_UP_S only
    for i in range(3600):
        slow.heard(0.5, now=float(i), waited=1.0)
    assert slow.due == pytest.approx(3599 - CATCH_UP_S + 0.5)
    # A sample a message, as fast as it goes (the flood measured sent ~8,000 a second): within a
    # second it is ahead of real time, so it no longer goes first.
    flood = StreamClock()
    for _ in range(6000):
        flood.heard(1 / 16000, now=100.0, waited=0.0)
    assert flood.due > 100.0
    # A browser's 128-sample blocks at 192 kHz, sent as recorded for a minute: never ahead of real time.
    block = 128 / 192_000
    browser = StreamClock()
    for i in range(round(60 / block)):
        browser.heard(block, now=i * block, waited=block)
    assert browser.due <= 60.0


def test_stream_turns_go_to_the_stream_due_first_and_pass_on_when_cancelled():
    order = []

    async def scenario():
        turns, started = StreamTurns(), anyio.Event()

        def first():
            order.append("first")
            anyio.from_thread.run_sync(started.set)
            time.sleep(0.2)  # the turn is busy while the others come

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(turns.run, 0.0, first)
            await started.wait()
            for name, lead in (("fast", 40.0), ("live", -0.1), ("ahead", 2.0), ("gone", -5.0)):
                tasks.start_soon(turns.run, lead, order.append, name)
            await anyio.sleep(0.05)
            with anyio.CancelScope() as gone:  # the client least ahead leaves while it waits
                gone.cancel()
                await turns.run(-9.0, order.append, "cancelled")
        return turns

    turns = anyio.run(scenario)
    assert order == ["first", "gone", "live", "ahead", "fast"] and not turns._busy and not turns._waiting


def test_a_stream_sent_too_slowly_is_closed(client, monkeypatch):
    monkeypatch.setattr("kws.server.STREAM_WINDOW_S", 0.5)
    with client.websocket_connect("/stream") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.send_bytes(bytes(640))
        time.sleep(1.0)  # 20 ms of audio in a second: a trickle, or the wrong ?rate=
        ws.send_bytes(bytes(640))
        ws.receive_text()
    assert (closed.value.code, closed.value.reason) == (
        1008,
        "only 0 s of audio in 1 s: send it as it is recorded, at the ?rate= given",
    )


def test_a_stream_silent_for_the_idle_limit_is_closed_and_its_place_freed(client, monkeypatch):
    monkeypatch.setattr("kws.server.IDLE_SECONDS", 1.0)
    with client.websocket_connect("/stream") as steady, pytest.raises(WebSocketDisconnect) as ended:
        for _ in range(15):  # 1.5 s of messages 0.1 s apart: never idle for 1 s
            steady.send_bytes(bytes(640))
            time.sleep(0.1)
        steady.send_text(END)
        steady.receive_text()
    assert ended.value.code == 1000
    sent = []

    async def connect_then_nothing():
        yield {"type": "websocket.connect"}
        await asyncio.sleep(3600)  # a client that stays connected and says nothing

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/stream", "query_string": b"", "headers": [], "subprotocols": []}
    messages = connect_then_nothing()
    asyncio.run(asyncio.wait_for(client.app(scope, messages.__anext__, send), 10))
    assert [message["type"] for message in sent] == ["websocket.accept", "websocket.close"]
    assert (sent[1]["code"], sent[1]["reason"]) == (
        1008,
        "no message for 1 s: send audio without pauses (silence too)",
    )
    assert client.app.state.open_streams == 0  # its place is free again


def test_a_damaged_mp3_upload_leaves_the_servers_log_alone(model, capfd):
    t = np.arange(SAMPLE_RATE * 20) / SAMPLE_RATE
    buffer = io.BytesIO()
    sf.write(
        buffer, (0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t)).astype(np.float32), SAMPLE_RATE, format="MP3"
    )
    damaged = bytearray(buffer.getvalue())
    rng = np.random.default_rng(0)
    for at in rng.integers(1000, len(damaged), 3000):  # bytes flipped all through it
        damaged[at] ^= 0xFF
    capfd.readouterr()
    try:
        answer = workers.detect(model, bytes(damaged), "damaged.mp3", 60.0, None, None)
    except RequestError as refused:
        answer = refused
    assert capfd.readouterr().err == ""  # libmpg123 printed a line per bad frame, naming no request
    assert isinstance(answer, RequestError) or answer["file"] == "damaged.mp3"


def test_the_upload_budget_counts_bytes_as_they_arrive_and_never_refuses_the_oldest_upload():
    from fastapi import HTTPException

    budget = UploadBudget(10)
    with budget.share() as alone:
        alone.take(5)
        alone.take(50)  # the only upload: it fits whatever its size (--max-bytes bounds it)
    # An idle connection holds nothing; the newest request is the one refused, not an older one.
    with budget.share() as old, budget.share() as idle, budget.share() as new:
        old.take(8)
        new.take(1)
        old.take(5)  # past the limit, but the oldest: it goes on
        with pytest.raises(HTTPException) as refused:
            new.take(1)
        assert refused.value.status_code == 503 and refused.value.detail.startswith("busy: 13 bytes of other")
        assert budget.held == 14 and idle.taken == 0
    assert budget.held == 0  # every share given back
