"""`kws listen`: microphone and file share one path (callback, queue, resampling, Detector, printing)."""

import contextlib
import functools
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import REPO, need
from test_stream import tone_recording

from kws import Stopped, audio, listen, stream_eval
from kws.audio import ModelRate
from kws.cli import main
from kws.features import SAMPLE_RATE
from kws.runtime import Model
from kws.stream import Detector, detection_config

RATE = 44_100  # a microphone's rate, not the model's
HOP_SECONDS = 0.02
PRINT_ROUNDING = 0.005  # events are printed to 0.01 s
EVENT_LINE = re.compile(r"^\s*(\d+\.\d+) -\s+(\d+\.\d+) s  (\S+)\s+(\d\.\d+)$", re.MULTILINE)
# Python ignores SIGINT in a child that inherited it ignored; a real terminal's Ctrl-C is never ignored.
MAIN_WITH_CTRL_C = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from kws.cli import main; sys.exit(main(sys.argv[1:]))"
)


def write_recording(path, words, rate=RATE):
    """Tone words as a stereo file at ``rate`` (channels at different levels); the 16 kHz truth."""
    audio, truth = tone_recording(words)
    resampled = soxr.resample(audio, SAMPLE_RATE, rate)
    sf.write(path, np.stack([resampled, 0.5 * resampled], axis=1), rate, subtype="FLOAT")
    return truth


def events(text):
    return [
        (float(start), float(end), label, float(score))
        for start, end, label, score in EVENT_LINE.findall(text)
    ]


@pytest.fixture(scope="module")
def words_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("listen") / "words.wav"
    return path, write_recording(path, ["yes", "no", "up", "down"])


@pytest.fixture(scope="module")
def model_args(tone_export):
    return ["--model", str(tone_export[0]), "--threshold", "0.6"]


def detect_file(tone_export, path, seconds=None):
    """What ``Detector.detect`` finds in (the first ``seconds`` of) a file, resampled as listen does."""
    samples, rate = sf.read(path, dtype="float32", frames=-1 if seconds is None else round(seconds * RATE))
    to_model_rate = ModelRate(rate)
    converted = np.concatenate([to_model_rate.convert(samples), to_model_rate.finish()])
    model = Model.load(tone_export[0])
    return Detector(model, detection_config(model.manifest, 0.6)).detect(converted)


def assert_printed(out, expected):
    printed = events(out)
    assert [label for _, _, label, _ in printed] == [event.label for event in expected]
    for (start, end, _, score), event in zip(printed, expected, strict=True):
        assert start == pytest.approx(event.start, abs=HOP_SECONDS + PRINT_ROUNDING)
        assert end == pytest.approx(event.end, abs=HOP_SECONDS + PRINT_ROUNDING)
        assert score == pytest.approx(event.score, abs=0.001)


def counted(labels):
    counts = Counter(labels)
    return ", ".join(f"{word} {counts[word]}" for word in ("yes", "no", "up", "down"))


def test_file_played_fast_prints_what_detect_finds_in_it(words_file, model_args, tone_export, capsys):
    path, truth = words_file
    assert main(["listen", "--file", str(path), "--fast", *model_args]) == 0
    out, err = capsys.readouterr()
    expected = detect_file(tone_export, path)
    assert_printed(out, expected)
    found, _ = stream_eval.match(expected, truth)
    assert found == [True] * 4
    duration, counts = sf.info(str(path)).duration, counted(event.label for event in expected)
    assert out.splitlines()[-1] == f"listened {duration:.1f} s: {len(expected)} detections ({counts})"
    assert err.startswith(f"kws listen: {path} at 44100 Hz") and "Traceback" not in err
    assert "kws listen: listening; Ctrl-C to stop\n" in err


def test_json_prints_each_detection_as_a_line_of_detects_json(words_file, model_args, tone_export, capsys):
    path, _ = words_file
    assert main(["listen", "--file", str(path), "--fast", "--json", *model_args]) == 0
    out, err = capsys.readouterr()
    expected = detect_file(tone_export, path)
    printed = [json.loads(line) for line in out.splitlines()]  # every line of the output is an event
    assert [event["label"] for event in printed] == [event.label for event in expected] != []
    for event, want in zip(printed, expected, strict=True):
        assert set(event) == {"label", "score", "start", "end"}
        assert event["start"] == pytest.approx(want.start, abs=HOP_SECONDS)
        assert event["score"] == pytest.approx(want.score, abs=0.001)
    assert err.splitlines()[-1].startswith(f"listened {sf.info(str(path)).duration:.1f} s: {len(expected)} ")


@pytest.mark.parametrize("output", ["pipe", "socket"])  # Node.js gives its children socket pairs
def test_a_reader_that_exits_stops_listening_at_once_not_at_the_next_event(tmp_path, tone_export, output):
    # `kws listen --json | program`: the program exits in a quiet room, where no event would be
    # printed for hours (here a silent file played in real time); listening stops at once.
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, np.zeros(90 * RATE, np.float32), RATE)
    command = [
        sys.executable,
        "-m",
        "kws",
        "listen",
        "--file",
        str(quiet),
        "--json",
        "--model",
        str(tone_export[0]),
    ]
    ours, theirs = socket.socketpair() if output == "socket" else (None, subprocess.PIPE)
    started = time.monotonic()
    with subprocess.Popen(command, stdout=theirs, stderr=subprocess.PIPE, text=True) as process:
        if ours is None:
            process.stdout.close()  # the reader is gone before listening starts
        else:
            theirs.close()
            ours.close()
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and time.monotonic() - started < 45  # the file lasts 90 s
    assert re.fullmatch(
        r"listened \d+\.\d s \(stopped by its reader's exit\): 0 detections .*", err.splitlines()[-1]
    )
    assert "Traceback" not in err and "Exception ignored" not in err


def test_audio_piped_in_is_heard_as_it_arrives_as_the_file_is(words_file, tone_export):
    # arecord | kws listen --file -: the writer holds the pipe open, and each keyword is printed
    # while it does, not at the end of the audio.
    path, _ = words_file
    data = path.read_bytes()
    last_second = RATE * 2 * 4  # stereo float32
    command = [sys.executable, "-m", "kws", "listen", "--file", "-", "--json", "--model", str(tone_export[0])]
    with subprocess.Popen(
        [*command, "--threshold", "0.6"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as process:
        process.stdin.write(data[:-last_second])
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 60)
        first = json.loads(process.stdout.readline()) if ready else None
        process.stdin.write(data[-last_second:])
        out, _ = process.communicate(timeout=60)
        rest = [json.loads(line) for line in out.splitlines()]
    expected = detect_file(tone_export, path)
    assert first is not None and process.returncode == 0
    assert [event["label"] for event in [first, *rest]] == [event.label for event in expected] != []
    for event, want in zip([first, *rest], expected, strict=True):
        assert event["start"] == pytest.approx(want.start, abs=HOP_SECONDS)


class Writer:
    """The writing end of the pipe a test puts on standard input."""

    def __init__(self, descriptor):
        self.descriptor = descriptor
        self._closing = threading.Lock()
        self._sender = None

    def write(self, data):
        os.write(self.descriptor, data)

    def send_and_close(self, data):
        """Write ``data`` and close, from a thread: a pipe holds only 64 KiB unread."""

        def send():
            with contextlib.suppress(BrokenPipeError):  # kws stopped reading, as it may
                self.write(data)
            self.close()

        self._sender = threading.Thread(target=send, daemon=True)
        self._sender.start()

    def close(self):
        with self._closing:
            if self.descriptor is not None:
                os.close(self.descriptor)
                self.descriptor = None

    def finish(self):
        if self._sender is not None:
            self._sender.join(10)
        self.close()


@pytest.fixture
def piped_stdin(monkeypatch):
    """Standard input as the reading end of a pipe; yields its Writer."""
    reading, writing = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(reading, "rb"))
    writer = Writer(writing)
    yield writer
    sys.stdin.close()  # first: a sender blocked on a full pipe gets its BrokenPipeError
    writer.finish()


@pytest.mark.parametrize("sent", [b"", b"RIFF\x24\x00\x00\x00WA"], ids=["nothing", "part of a header"])
def test_ctrl_c_while_a_pipe_is_yet_to_send_audio_stops_at_once(piped_stdin, model_args, capsys, sent):
    # The writer (ffmpeg connecting to a camera) has sent nothing, or not its whole header, yet:
    # libsndfile, left to wait for it, would not return for Ctrl-C. Past 10 s the pipe is closed
    # to end the test.
    piped_stdin.write(sent)
    started = time.monotonic()
    with later(0.5, signal.raise_signal, signal.SIGINT), later(10, piped_stdin.close):
        assert main(["listen", "--file", "-", *model_args]) == 0
    assert time.monotonic() - started < 5
    assert capsys.readouterr().err == "kws listen: stopped with Ctrl-C before listening began\n"


@contextlib.contextmanager
def later(seconds, action, *args):
    """Do ``action(*args)`` in ``seconds`` unless the block has ended by then: a signal left
    to go off would stop another test."""
    timer = threading.Timer(seconds, action, args)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def riff(fmt, pcm, data_size=None, before=b"", after=b""):
    """A WAV's bytes: ``before`` (other chunks), the fmt chunk ``fmt``, the data chunk of ``pcm``
    with its size field set to ``data_size`` (as a writer to a pipe sets it: 0xFFFFFFFF), and
    ``after`` its samples."""
    size = len(pcm) if data_size is None else data_size
    body = b"WAVE" + before + struct.pack("<4sI", b"fmt ", len(fmt)) + fmt
    body += struct.pack("<4sI", b"data", size) + pcm + after
    return struct.pack("<4sI", b"RIFF", len(body)) + body


def wav_bytes(samples, data_size=None, after=b""):
    """16 kHz 16-bit mono WAV of float ``samples``, as ``riff`` lays it out."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
    return riff(fmt, pcm, data_size, after=after)


@pytest.mark.parametrize(
    ("data_size", "heard"),
    [
        (0xFFFFFFFF, 6.0),  # ffmpeg's placeholder: the audio goes on to the end of the pipe
        (0, 6.0),  # others'
        (2 * 2 * SAMPLE_RATE, 2.0),  # a file's own: what follows its samples is another chunk
    ],
)
def test_a_pipes_wav_is_read_to_its_end_unless_its_header_gives_its_size(
    piped_stdin, model_args, capsys, data_size, heard
):
    samples = audio.fix_length(tone_recording(["yes", "no"])[0], 6 * SAMPLE_RATE)
    piped = wav_bytes(samples, data_size, after=b"LIST\x04\x00\x00\x00INFO")
    piped_stdin.send_and_close(piped)
    assert main(["listen", "--file", "-", *model_args]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"listened {heard:.1f} s: ")


@pytest.mark.parametrize(
    ("piped", "reason"),
    [
        (b"", "nothing arrived (its writer ended before sending audio)"),
        (np.zeros(SAMPLE_RATE, np.int16).tobytes(), f"not WAV audio (it begins {bytes(12)!r})"),
        (b"OggS\x00\x02" + bytes(200), "not WAV audio (it begins b'OggS\\x00\\x02" + "\\x00" * 6 + "')"),
        (wav_bytes(np.zeros(100))[:40], "it ended inside its WAV header"),
    ],
    ids=["nothing", "raw samples", "ogg", "cut header"],
)
def test_audio_piped_in_that_is_not_wav_says_what_to_pipe(piped_stdin, model_args, capsys, piped, reason):
    piped_stdin.send_and_close(piped)
    assert main(["listen", "--file", "-", *model_args]) == 2
    assert capsys.readouterr().err == (
        f"kws listen: error: standard input: {reason}: pipe in WAV, as arecord and ffmpeg -f wav - write it "
        "(raw samples do not say their rate), or give a file by its path\n"
    )


def test_a_readers_exit_is_seen_while_a_pipe_sends_nothing(piped_stdin, tone_export):
    # The writer holds the pipe open and sends nothing; the program reading the events exits:
    # listening stops then, not at the stall's error 5 s on.
    piped_stdin.write(wav_bytes(np.zeros(SAMPLE_RATE), 0xFFFFFFFF))
    reading, writing = os.pipe()
    detector = Detector(Model.load(tone_export[0]))
    with os.fdopen(reading, "rb") as reader, os.fdopen(writing, "w") as out:
        started = time.monotonic()
        with later(1.0, reader.close):
            summary = listen.run(listen.recording(None), detector, out, as_json=True)
    assert summary.stopped_by == listen.READER_GONE and summary.seconds == 1.0
    assert time.monotonic() - started < 1.0 + 2 * listen.READER_CHECK_SECONDS + 0.5


def test_a_pipe_that_pauses_is_waited_for_where_a_silent_microphone_is_an_error(
    piped_stdin, tone_export, monkeypatch
):
    monkeypatch.setattr(listen, "STALL_SECONDS", 0.2)
    piped_stdin.write(wav_bytes(np.zeros(SAMPLE_RATE), 0xFFFFFFFF))
    detector = Detector(Model.load(tone_export[0]))
    with later(1.0, piped_stdin.send_and_close, wav_bytes(np.zeros(SAMPLE_RATE))[44:]):
        summary = listen.run(listen.recording(None), detector, io.StringIO())
    assert summary.seconds == 2.0 and summary.stopped_by is None


def test_standard_input_redirected_from_a_file_is_heard_whole(
    words_file, model_args, tone_export, monkeypatch, capsys
):
    # kws listen --file - < words.wav, or systemd's StandardInput=file:
    path, _ = words_file
    with open(path, "rb") as file:
        monkeypatch.setattr(sys, "stdin", file)
        assert main(["listen", "--file", "-", "--json", *model_args]) == 0
    printed = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert printed == [event.label for event in detect_file(tone_export, path)] != []


def wav_variant(samples, variant):
    """WAV bytes of float ``samples`` (16 kHz mono) as other writers make them."""
    if variant == "float extensible":  # ffmpeg's float, or over 2 channels
        sub = struct.pack("<HIH", 22, 32, 0) + struct.pack("<H", 3) + bytes(14)
        fmt = struct.pack("<HHIIHH", 0xFFFE, 1, SAMPLE_RATE, 4 * SAMPLE_RATE, 4, 32) + sub
        pcm = samples.astype("<f4").tobytes()
    else:  # 24-bit PCM, after an odd-sized chunk padded to an even size
        ints = np.round(np.clip(samples, -1, 1) * (2**23 - 1)).astype("<i4")
        pcm = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        fmt = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, 3 * SAMPLE_RATE, 3, 24)
    odd_chunk = struct.pack("<4sI", b"junk", 3) + b"abc\x00"
    return riff(fmt, pcm, 0xFFFFFFFF, before=odd_chunk if variant == "24-bit after an odd chunk" else b"")


@pytest.mark.parametrize("variant", ["float extensible", "24-bit after an odd chunk"])
def test_a_pipes_wav_header_is_read_however_it_is_laid_out_and_sent(piped_stdin, variant):
    samples = np.sin(np.arange(SAMPLE_RATE) / 7.0).astype(np.float32) * 0.5
    piped = wav_variant(samples, variant)
    piped_stdin.write(piped[:7])  # a header that arrives in pieces
    with later(0.2, piped_stdin.send_and_close, piped[7:]):
        native = audio.NativeAudio(None)
        heard = np.concatenate(list(native.blocks(800)))
    assert (native.samplerate, native.channels) == (SAMPLE_RATE, 1)
    np.testing.assert_allclose(heard[:, 0], samples, atol=1e-6)


def test_file_dash_from_a_terminal_says_how_to_pipe_audio_in(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", Terminal())
    assert main(["listen", "--file", "-"]) == 2
    assert capsys.readouterr().err == (
        "kws listen: error: --file - reads audio piped in, as in: "
        "arecord -f S16_LE -r 16000 | kws listen --file -\n"
    )


class Terminal(io.StringIO):
    """Output that says it is a terminal, where listen draws its level meter."""

    def isatty(self):
        return True


def one_yes(tmp_path, tone_export):
    """A recording of one tone "yes", and a Detector that hears it."""
    path = tmp_path / "yes.wav"
    write_recording(path, ["yes"])
    model = Model.load(tone_export[0])
    return path, Detector(model, detection_config(model.manifest, 0.6))


def test_json_draws_no_level_meter_on_a_terminal(tmp_path, tone_export):
    path, detector = one_yes(tmp_path, tone_export)
    terminal = Terminal()
    summary = listen.run(listen.recording(path, realtime=False), detector, terminal, as_json=True)
    lines = terminal.getvalue().splitlines()
    assert summary.counts["yes"] == len(lines) >= 1
    assert [json.loads(line)["label"] for line in lines] == ["yes"] * len(lines)


def test_seconds_stops_listening_after_that_much_audio(words_file, model_args, tone_export, capsys):
    path, truth = words_file
    assert truth[0][2] < 3.0 < truth[1][1]  # the first word only
    assert main(["listen", "--file", str(path), "--fast", "--seconds", "3", *model_args]) == 0
    out = capsys.readouterr().out
    expected = detect_file(tone_export, path, seconds=3)
    assert_printed(out, expected)
    assert {event.label for event in expected} == {"yes"}
    count, counts = len(expected), counted(event.label for event in expected)
    assert out.splitlines()[-1] == f"listened 3.0 s: {count} detection{'s' * (count > 1)} ({counts})"


def test_listen_clips_and_refuses_audio_as_detect_does(words_file, model_args, tmp_path, capsys):
    # A float file may hold values far beyond full scale, or NaN: both commands must read it alike.
    samples, rate = sf.read(words_file[0], dtype="float32")
    loud, broken = tmp_path / "loud.wav", tmp_path / "nan.wav"
    sf.write(loud, 1000 * samples, rate, subtype="FLOAT")
    samples[rate, 0] = np.nan
    sf.write(broken, samples, rate, subtype="FLOAT")

    assert main(["detect", str(loud), "--json", *model_args]) == 0
    found = json.loads(capsys.readouterr().out)["detections"]
    assert main(["listen", "--file", str(loud), "--fast", *model_args]) == 0
    printed = events(capsys.readouterr().out)
    assert found and [event[2] for event in printed] == [event["label"] for event in found]
    for (start, end, _, score), event in zip(printed, found, strict=True):
        assert (start, end, score) == pytest.approx(
            (event["start"], event["end"], event["score"]), abs=PRINT_ROUNDING
        )

    assert main(["detect", str(broken), *model_args]) == 1
    assert capsys.readouterr().err == f"kws detect: skipping {broken}: holds NaN or infinite samples\n"
    assert main(["listen", "--file", str(broken), "--fast", *model_args]) == 2
    assert capsys.readouterr().err.endswith(f"kws listen: error: {broken}: holds NaN or infinite samples\n")
    # What the header tells is refused before listening starts.
    empty, narrow = tmp_path / "empty.wav", tmp_path / "6k.wav"
    sf.write(empty, np.zeros(0, np.float32), rate)
    sf.write(narrow, samples[:6000, 0], 6000)
    for path, reason in ((empty, "holds no audio samples"), (narrow, "recorded at 6000 Hz")):
        assert main(["listen", "--file", str(path), "--fast", *model_args]) == 2
        assert capsys.readouterr().err.startswith(f"kws listen: error: {path}: {reason}")


def test_listen_plays_an_mp3_without_the_decoders_complaints(model_args, tmp_path, capfd):
    mp3 = tmp_path / "words.mp3"
    samples, _ = tone_recording(["yes", "no", "up", "down"])
    sf.write(mp3, samples, SAMPLE_RATE, format="MP3")  # at 16 kHz, where it complained
    assert main(["detect", str(mp3), "--json", *model_args]) == 0
    found = [event["label"] for event in json.loads(capfd.readouterr().out)["detections"]]
    assert main(["listen", "--file", str(mp3), "--fast", *model_args]) == 0
    out, err = capfd.readouterr()
    assert [event[2] for event in events(out)] == found and found
    assert "mpg123" not in err  # its reads of a few milliseconds made libmpg123 log errors


def play(path, realtime, stop_after=None):
    """Blocks a FileInputStream hands to its callback, the seconds it took, and whether it finished."""
    blocks, finished = [], threading.Event()

    def callback(indata, frames, time_info, status):
        blocks.append(indata.copy() if frames == len(indata) else None)

    began = time.monotonic()
    stream = listen.FileInputStream(
        audio.NativeAudio(path),
        blocksize=2205,
        callback=callback,
        finished_callback=finished.set,
        realtime=realtime,
    )
    stream.start()
    try:
        finished.wait(stop_after)
    finally:
        stream.close()
    return stream, blocks, time.monotonic() - began, finished.is_set()


def test_file_stream_delivers_blocks_at_the_files_rate_and_channels(tmp_path):
    path = tmp_path / "ramp.wav"
    content = np.linspace(-0.5, 0.5, 2 * 22_100, dtype=np.float32).reshape(-1, 2)  # 0.5 s
    sf.write(path, content, RATE, subtype="FLOAT")
    stream, blocks, seconds, finished = play(path, realtime=True, stop_after=5)
    assert (stream.samplerate, stream.channels, finished) == (RATE, 2, True)
    assert [b.shape for b in blocks] == [(2205, 2)] * 10 + [(50, 2)]
    assert all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), content)
    assert 0.49 <= seconds < 1.5  # in real time: the last block is due 0.5 s after the start
    _, fast_blocks, fast_seconds, _ = play(path, realtime=False, stop_after=5)
    np.testing.assert_array_equal(np.concatenate(fast_blocks), content)
    assert fast_seconds < 0.45  # not paced


def test_stopping_a_file_stream_ends_its_blocks(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros((RATE * 10, 1), np.float32), RATE)
    _, blocks, seconds, finished = play(path, realtime=True, stop_after=0.3)
    count = len(blocks)
    time.sleep(0.2)
    assert finished and len(blocks) == count  # nothing after stop
    assert 0.3 / listen.BLOCK_SECONDS - 2 <= count <= seconds / listen.BLOCK_SECONDS + 1


def test_level_meter_draws_on_a_terminal_and_clears_for_each_detection(tmp_path, tone_export):
    path, detector = one_yes(tmp_path, tone_export)
    terminal = Terminal()
    began = time.monotonic()
    summary = listen.run(listen.recording(path), detector, terminal)
    elapsed = time.monotonic() - began
    text = terminal.getvalue()
    meters = re.findall(r"\r\s*(\d+\.\d) s  \[([#-]{30})\]\s+(-?\d+\.\d) dBFS", text)
    assert summary.seconds / listen.METER_SECONDS / 3 <= len(meters) <= elapsed / listen.METER_SECONDS + 1
    levels = [float(level) for _, _, level in meters]
    assert max(levels) > -25 and min(levels) < -40  # the word, and the quiet around it
    assert re.search(r"\r\x1b\[K\s*\d+\.\d+ -\s+\d+\.\d+ s  yes ", text)
    last_meter = text.rindex(" dBFS") + len(" dBFS")
    assert text[last_meter:].startswith("\r\x1b[K")  # the bar never stays beside what follows
    assert summary.counts["yes"] >= 1 and summary.counts == {**summary.counts, "no": 0, "up": 0, "down": 0}


# --fast: the file's thread is then waiting for room in a full queue, and must not hang the exit.
@pytest.mark.parametrize("pace", [[], ["--fast"]])
def test_ctrl_c_stops_listening_with_a_summary_and_code_0(words_file, model_args, monkeypatch, capsys, pace):
    pushes = 0
    push = Detector.push

    def interrupted_push(self, samples):
        nonlocal pushes
        pushes += 1
        if pushes == 20:
            raise KeyboardInterrupt
        return push(self, samples)

    monkeypatch.setattr(Detector, "push", interrupted_push)
    path, _ = words_file
    monkeypatch.setattr(listen, "QUEUE_BLOCKS", 4)
    assert main(["listen", "--file", str(path), *pace, *model_args]) == 0  # still playing at 1 s
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "listened 1.0 s (stopped with Ctrl-C): 0 detections (yes 0, no 0, up 0, down 0)"
    ]
    assert "Traceback" not in err and "interrupted" not in err
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("play ")]


def test_a_stop_before_listening_began_ends_as_a_stop_while_listening(
    words_file, model_args, monkeypatch, capsys
):
    # systemctl stop (SIGTERM) while the model loads: code 0, as later, not 143 (a failed unit).
    def stopped_loading(*args, **kwargs):
        raise Stopped("SIGTERM")

    monkeypatch.setattr(Model, "load", stopped_loading)
    assert main(["listen", "--file", str(words_file[0]), *model_args]) == 0
    assert capsys.readouterr().err.endswith("kws listen: stopped by SIGTERM before listening began\n")


def test_a_file_played_fast_waits_for_the_detector_instead_of_piling_up(words_file, tone_export, monkeypatch):
    path, _ = words_file
    source = listen.recording(path, realtime=False)
    sent = heard = 0
    ahead = []

    def counting_open(*, callback, **settings):
        def counted(*args):
            nonlocal sent
            sent += 1
            callback(*args)

        return source.open(callback=counted, **settings)

    push = Detector.push

    def slow_push(self, samples):
        nonlocal heard
        heard += 1
        ahead.append(sent - heard)
        time.sleep(0.002)
        return push(self, samples)

    monkeypatch.setattr(Detector, "push", slow_push)
    monkeypatch.setattr(listen, "QUEUE_BLOCKS", 10)
    model = Model.load(tone_export[0])
    summary = listen.run(replace(source, open=counting_open), Detector(model), io.StringIO())
    assert summary.seconds == pytest.approx(sf.info(str(path)).duration, abs=0.01)
    assert len(ahead) > 50 and 9 <= max(ahead) <= 11  # a full queue, and the block waiting to go in


def test_an_input_that_goes_silent_is_an_error(monkeypatch, tone_export):
    class DeadStream:
        def __init__(self, **settings):
            pass

        def start(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(listen, "STALL_SECONDS", 0.2)
    model = Model.load(tone_export[0])
    source = listen.Source("input device 7 'broken'", RATE, DeadStream, endless=True)
    announced = []
    with pytest.raises(listen.ListenError, match=r"^input device 7 'broken' delivered no audio for 0.2 s$"):
        listen.run(source, Detector(model), io.StringIO(), on_audio=lambda: announced.append(True))
    assert announced == []  # never told to speak into an input that delivers nothing


def test_listening_is_announced_once_the_device_delivers_audio_not_when_it_opens(tone_export):
    # PulseAudio's device started 0.6-1.7 s after it opened: words said in between were lost.
    happened, announced = [], threading.Event()

    class SlowStartingDevice:
        def __init__(self, callback, finished_callback, blocksize, **settings):
            self.callback, self.finished, self.blocksize = callback, finished_callback, blocksize

        def deliver(self, blocks):
            for _ in range(blocks):
                happened.append("block")
                self.callback(np.zeros((self.blocksize, 1), np.float32), self.blocksize, None, None)

        def play(self):
            self.deliver(1)
            announced.wait(5)
            self.deliver(3)
            self.finished()

        def start(self):
            happened.append("opened")
            threading.Timer(0.3, self.play).start()

        def stop(self):
            pass

        def close(self):
            pass

    def on_audio():
        happened.append("announced")
        announced.set()

    source = listen.Source("a slow device", RATE, SlowStartingDevice)
    summary = listen.run(source, Detector(Model.load(tone_export[0])), io.StringIO(), on_audio=on_audio)
    assert happened == ["opened", "block", "announced", "block", "block", "block"]
    assert summary.seconds == pytest.approx(4 * listen.BLOCK_SECONDS)


@pytest.mark.parametrize("noticed_by", ["the stall limit", "Ctrl-C"])
def test_an_input_gone_silent_is_aborted_as_stopping_it_can_hang(tone_export, monkeypatch, noticed_by):
    class SilentDevice:  # as a suspended PulseAudio source: no callback, and a stop that waits on it
        aborted = False

        def __init__(self, **settings):
            pass

        def start(self):
            pass

        def stop(self):
            raise AssertionError("stopped without aborting: PortAudio's stop would wait for minutes")

        def abort(self):
            SilentDevice.aborted = True

        def close(self):
            assert SilentDevice.aborted

    source = listen.Source("input device 0 'pulse'", RATE, SilentDevice, endless=True)
    detector = Detector(Model.load(tone_export[0]))
    if noticed_by == "Ctrl-C":
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        assert listen.run(source, detector, io.StringIO()).stopped_by == "Ctrl-C"
    else:
        monkeypatch.setattr(listen, "STALL_SECONDS", 0.2)
        with pytest.raises(listen.ListenError, match="delivered no audio for 0.2 s"):
            listen.run(source, detector, io.StringIO())
    assert SilentDevice.aborted


def test_an_abort_that_hangs_is_left_behind_and_a_signal_meanwhile_hides_no_error(tone_export, monkeypatch):
    class FrozenServer:  # PulseAudio stopped (SIGSTOP): PortAudio's abort waited 60 s for it
        def __init__(self, **settings):
            pass

        def start(self):
            pass

        def abort(self):
            time.sleep(30)

    monkeypatch.setattr(listen, "STALL_SECONDS", 0.2)
    monkeypatch.setattr(listen, "ABORT_SECONDS", 1.0)
    # sounddevice's exit handler ends PortAudio, which would wait on the stream left behind.
    sounddevice = types.SimpleNamespace(_exit_handler=lambda: None)
    monkeypatch.setitem(sys.modules, "sounddevice", sounddevice)
    unregistered = []
    monkeypatch.setattr(listen.atexit, "unregister", unregistered.append)
    source = listen.Source("input device 0 'pulse'", RATE, FrozenServer, endless=True)
    threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT)).start()  # while the abort hangs
    started = time.monotonic()
    with pytest.raises(listen.ListenError, match="delivered no audio for 0.2 s"):
        listen.run(source, Detector(Model.load(tone_export[0])), io.StringIO())
    assert 1.2 <= time.monotonic() - started < 5 and unregistered == [sounddevice._exit_handler]


DEVICES = [
    {"name": "HDA Intel PCH: ALC257 Analog (hw:0,0)", "max_input_channels": 2, "default_samplerate": 44100.0},
    {"name": "HDA Intel PCH: HDMI 0 (hw:0,3)", "max_input_channels": 0, "default_samplerate": 48000.0},
    {"name": "USB Mic: Audio (hw:1,0)", "max_input_channels": 1, "default_samplerate": 48000.0},
    {"name": "pulse", "max_input_channels": 32, "default_samplerate": 44100.0},
]


class PortAudioError(Exception):
    pass


def fake_sounddevice(monkeypatch, devices, default_input=-1, stream=None):
    """A sounddevice module that lists ``devices``: device handling is tested without PortAudio."""
    module = types.ModuleType("sounddevice")
    module.query_devices = lambda: [dict(device, max_output_channels=2) for device in devices]
    module.default = types.SimpleNamespace(device=[default_input, default_input])
    module.PortAudioError = PortAudioError
    module.InputStream = stream or (lambda **settings: pytest.fail("this test opens no stream"))
    monkeypatch.setitem(sys.modules, "sounddevice", module)
    return module


def test_list_devices_shows_inputs_with_channels_and_rates(monkeypatch, capsys):
    fake_sounddevice(monkeypatch, DEVICES, default_input=3)
    assert main(["listen", "--list-devices"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "   index  name                                   channels  default rate",
        "       0  HDA Intel PCH: ALC257 Analog (hw:0,0)         2      44100 Hz",
        "       2  USB Mic: Audio (hw:1,0)                       1      48000 Hz",
        "*      3  pulse                                        32      44100 Hz",
        "(* = used when no --device is given)",
    ]


@pytest.mark.parametrize(
    ("wanted", "default_input", "index"),
    [(None, 2, 2), (None, -1, 0), ("3", -1, 3), ("usb", -1, 2), (" PULSE ", -1, 3), ("alc257", -1, 0)],
)
def test_device_is_picked_by_index_or_name(monkeypatch, wanted, default_input, index):
    fake = fake_sounddevice(monkeypatch, DEVICES, default_input)
    source = listen.microphone(wanted)
    assert source.open.func is fake.InputStream and source.errors == (PortAudioError,)
    assert source.open.keywords == {
        "device": index,
        "samplerate": source.samplerate,
        "channels": 1,
        "dtype": "float32",
    }
    assert source.samplerate == DEVICES[index]["default_samplerate"]
    assert source.name == f"input device {index} {DEVICES[index]['name']!r}"


@pytest.mark.parametrize(
    ("devices", "argv", "message"),
    [
        (
            [],
            ["listen"],
            "no audio input device found (PortAudio lists no devices); plug in a microphone and check that "
            "the system sees it (Linux: arecord -l; run as a service, that the user's sound server, "
            "PulseAudio or PipeWire, is running)\n",
        ),
        ([], ["listen", "--list-devices"], "no audio input device found (PortAudio lists no devices)"),
        (
            DEVICES[1:2],
            ["listen"],
            "no audio input device found (PortAudio lists only outputs: 0 'HDA Intel PCH: HDMI 0 (hw:0,3)')",
        ),
        (
            DEVICES,
            ["listen", "--device", "bluetooth"],
            "--device 'bluetooth' names no input device; choose one of: 0 'HDA Intel PCH: ALC257 Analog "
            "(hw:0,0)', 2 'USB Mic: Audio (hw:1,0)', 3 'pulse'",
        ),
        (
            DEVICES,
            ["listen", "--device", "hdmi"],
            "--device 'hdmi' names only outputs, which record nothing (1 'HDA Intel PCH: HDMI 0 (hw:0,3)'); "
            "choose one of: 0 ",
        ),
        (DEVICES, ["listen", "--device", "1"], "--device '1' names only outputs, which record nothing (1 "),
        (DEVICES, ["listen", "--device", "7"], "--device '7' names no input device; choose one of: 0 "),
        (
            DEVICES,
            ["listen", "--device", "hw:"],
            "--device 'hw:' names several input devices; choose one of: 0 'HDA Intel PCH: ALC257 Analog "
            "(hw:0,0)', 2 'USB Mic: Audio (hw:1,0)'",
        ),
    ],
)
def test_missing_or_unknown_devices_are_clear_errors(monkeypatch, capsys, devices, argv, message):
    fake_sounddevice(monkeypatch, devices)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"kws listen: error: {message}") and "Traceback" not in err


def test_a_device_that_refuses_to_open_is_a_clear_error(monkeypatch, capsys, model_args):
    def refuse(**settings):
        raise PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    fake_sounddevice(monkeypatch, DEVICES, stream=refuse)
    assert main(["listen", "--device", "usb", *model_args]) == 2
    assert capsys.readouterr().err.endswith(
        "kws listen: error: input device 2 'USB Mic: Audio (hw:1,0)': "
        "Invalid sample rate [PaErrorCode -9997]\n"
    )


def test_missing_portaudio_says_what_to_install(monkeypatch, tmp_path, capsys):
    # What sounddevice does where libportaudio2 is not installed.
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["listen", "--list-devices"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "kws listen: error: cannot load PortAudio (PortAudio library not found): install it"
    )
    assert "apt-get install libportaudio2" in err and "brew install portaudio" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fast"], "--fast plays a --file faster than real time: give --file AUDIO"),
        (
            ["--file", "-", "--fast"],
            "--fast is for a file: audio piped in comes as fast as its writer sends it",
        ),
        (["--file", "nowhere.wav"], "nowhere.wav: no such file"),
        (["--file", "."], ".: a folder, not an audio file"),
    ],
)
def test_option_mistakes_are_clear_errors(capsys, argv, message):
    assert main(["listen", *argv]) == 2
    assert capsys.readouterr().err == f"kws listen: error: {message}\n"


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_seconds_must_be_a_positive_finite_number(seconds, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["listen", "--seconds", seconds])
    message = f"argument --seconds: must be a positive number of seconds, got {seconds}"
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_only_listen_imports_sounddevice(words_file, model_args):
    # sounddevice fails as it does without PortAudio (the Docker image has none): detect and
    # listen to a file or a pipe must work, listen to a microphone must reach for it.
    script = (
        "import importlib.abc, json, sys\n"
        "tried = []\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'sounddevice':\n"
        "            tried.append(name)\n"
        "            raise OSError('PortAudio library not found')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from kws.cli import main\n"
        "detected = main(sys.argv[1:])\n"
        "piped = main(['listen', '--file', '-', *sys.argv[3:]])\n"
        "before = list(tried)\n"
        "listened = main(['listen', '--list-devices'])\n"
        "print(json.dumps([detected, piped, before, listened, tried]))"
    )
    path, _ = words_file
    command = [sys.executable, "-c", script, "detect", str(path), *model_args]
    with open(path, "rb") as recording:
        done = subprocess.run(command, stdin=recording, capture_output=True, text=True, check=True, cwd=REPO)
    detected, piped, before, listened, tried = json.loads(done.stdout.splitlines()[-1])
    assert (detected, piped, before) == (0, 0, []) and "4 detections" in done.stdout
    assert listened == 2 and tried == ["sounddevice"]


def run_checked(command, env, timeout=15):
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=timeout)


@pytest.fixture
def pulseaudio(tmp_path):
    """A private PulseAudio daemon with a null sink whose monitor is the default source: the env to use it."""
    for tool, package in (
        ("pulseaudio", "pulseaudio"),
        ("pactl", "pulseaudio-utils"),
        ("paplay", "pulseaudio-utils"),
    ):
        need(shutil.which(tool), f"{tool} is not installed (Debian/Ubuntu: apt-get install {package})")
    runtime = tmp_path / "pulse"
    runtime.mkdir()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
        "PULSE_RUNTIME_PATH": str(runtime),
        "PULSE_SERVER": f"unix:{runtime}/native",
    }
    log = tmp_path / "pulseaudio.log"
    # -n: no default.pa, so no hardware probing; root may run it so, with a warning.
    command = ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=false"]
    modules = ["-L", "module-native-protocol-unix", "-L", "module-null-sink sink_name=kws_test"]
    with open(log, "w") as log_file:
        daemon = subprocess.Popen(command + modules, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PulseAudio did not start:\n{log.read_text()}")
            time.sleep(0.1)
        run_checked(["pactl", "set-default-source", "kws_test.monitor"], env)
        yield env
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def portaudio_device_names(env):
    script = "import sounddevice as sd; print('\\n'.join(d['name'] for d in sd.query_devices()))"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return done.stdout.splitlines() if done.returncode == 0 else None


def firsts(detections):
    """The first of each run of detections of one word: how often a word re-fires is the model's business."""
    return [d for i, d in enumerate(detections) if i == 0 or detections[i - 1][0] != d[0]]


def test_microphone_hears_keywords_played_into_pulseaudio(pulseaudio, tmp_path, model_args, tone_export):
    names = portaudio_device_names(pulseaudio)
    need(names is not None, "PortAudio is not installed (Debian/Ubuntu: apt-get install libportaudio2)")
    need("pulse" in names, f"PortAudio sees no 'pulse' device, only {names} (Debian: libasound2-plugins)")
    path = tmp_path / "words.wav"
    write_recording(path, truth := ["yes", "no", "up"], rate=48_000)
    listener = subprocess.Popen(
        [sys.executable, "-c", MAIN_WITH_CTRL_C, "listen", "--device", "pulse", *model_args],
        env=pulseaudio,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(90, listener.kill)
    watchdog.start()
    try:
        header = next((line for line in listener.stderr if line.startswith("kws listen:")), "")
        assert re.match(r"kws listen: input device \d+ 'pulse' at \d+ Hz", header), header
        # Played once listen says it hears: the device starts a second or so after it opens.
        assert next(listener.stderr, "") == "kws listen: listening; Ctrl-C to stop\n"
        run_checked(["paplay", "--device=kws_test", str(path)], pulseaudio, timeout=60)
        time.sleep(1.0)  # the averages over the last word complete
        listener.send_signal(signal.SIGINT)
        out, err = listener.communicate(timeout=30)
    finally:
        watchdog.cancel()
    assert listener.returncode == 0, err
    heard = [(label, end) for _, end, label, _ in events(out)]
    expected = [(event.label, event.end) for event in detect_file(tone_export, path)]
    assert [label for label, _ in firsts(heard)] == [label for label, _ in firsts(expected)] == truth, out
    # Each word fires a fixed latency after it does in the file: the device's audio was resampled right.
    latency = [
        end - expected_end
        for (_, end), (_, expected_end) in zip(firsts(heard), firsts(expected), strict=True)
    ]
    assert np.ptp(latency) <= 0.25, latency  # at a wrong rate the last word would drift by 0.4 s
    last = out.splitlines()[-1]
    assert last.endswith(
        f"(stopped with Ctrl-C): {len(heard)} detections ({counted(label for label, _ in heard)})"
    )
    assert "Traceback" not in err


class EndingStream:
    """An input stream that delivers ``blocks`` blocks of silence on opening, then ends; PortAudio
    flags an input overflow before the blocks numbered in ``overflows``."""

    def __init__(self, callback, finished_callback, blocksize, blocks, overflows=(), **settings):
        self.callback, self.finished, self.blocksize = callback, finished_callback, blocksize
        self.blocks, self.overflows = blocks, overflows

    def start(self):
        for index in range(self.blocks):
            status = types.SimpleNamespace(input_overflow=index in self.overflows)
            self.callback(np.zeros((self.blocksize, 1), np.float32), self.blocksize, None, status)
        self.finished()

    def stop(self):
        pass

    def abort(self):
        pass

    def close(self):
        pass


def test_a_microphone_that_goes_away_is_an_error_not_the_end_of_the_audio(monkeypatch, capsys, model_args):
    # 0.5 s of silence, then the end, as PortAudio does when a USB microphone goes.
    fake_sounddevice(monkeypatch, DEVICES, stream=functools.partial(EndingStream, blocks=10))
    assert main(["listen", "--device", "usb", *model_args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith(
        "kws listen: error: input device 2 'USB Mic: Audio (hw:1,0)' stopped delivering audio after 0.5 s "
        "(unplugged, or its sound server stopped)\n"
    )


def test_a_microphone_under_8_khz_is_refused(monkeypatch, capsys):
    fake_sounddevice(monkeypatch, [dict(DEVICES[2], default_samplerate=4000.0)])
    assert main(["listen"]) == 2
    assert capsys.readouterr().err == (
        "kws listen: error: input device 0 'USB Mic: Audio (hw:1,0)' records at 4000 Hz, under the 8000 Hz "
        "the model needs: choose another --device (kws listen --list-devices)\n"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_listening_with_a_summary_and_code_0(
    words_file, model_args, monkeypatch, capsys, signum
):
    pushes, push = 0, Detector.push

    def signalled_push(self, samples):
        nonlocal pushes
        pushes += 1
        if pushes == 20:
            os.kill(os.getpid(), signum)  # as docker stop or a closed terminal would
        return push(self, samples)

    monkeypatch.setattr(Detector, "push", signalled_push)
    before = signal.getsignal(signum)
    assert main(["listen", "--file", str(words_file[0]), "--fast", *model_args]) == 0
    name = signal.Signals(signum).name
    assert capsys.readouterr().out.splitlines() == [
        f"listened 1.0 s (stopped by {name}): 0 detections (yes 0, no 0, up 0, down 0)"
    ]
    assert signal.getsignal(signum) == before  # given back once listening ends


def test_ctrl_c_before_a_command_starts_is_no_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt  # while numpy and scipy load

    monkeypatch.setattr("kws.cli.build_parser", interrupted)
    assert main(["listen"]) == 130
    assert capsys.readouterr().err == "\nkws: interrupted\n"


def test_audio_the_input_dropped_is_reported_in_the_summary(tone_export):
    model = Model.load(tone_export[0])
    # A second of silence in 20 blocks, PortAudio flagging an overflow before two of them.
    stream = functools.partial(EndingStream, blocks=20, overflows=(5, 12))
    summary = listen.run(listen.Source("a test input", RATE, stream), Detector(model), io.StringIO())
    assert (summary.seconds, summary.overflows) == (pytest.approx(1.0), 2)
    assert str(summary).endswith(
        "; audio was lost 2 times (the input overflowed: the machine fell behind), so later times run early"
    )


@pytest.mark.parametrize("stderr_too", [False, True])
def test_a_closed_terminal_ends_listening_with_code_0(words_file, model_args, tmp_path, stderr_too):
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child: kws listen on a terminal, playing a file in real time
        if not stderr_too:
            os.dup2(os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT), 2)
        os.execv(
            sys.executable, [sys.executable, "-m", "kws", "listen", "--file", str(words_file[0]), *model_args]
        )
    try:
        deadline = time.monotonic() + 60
        while b"dBFS" not in os.read(terminal, 4096):  # the level meter: listening has begun
            assert time.monotonic() < deadline
    finally:
        os.close(terminal)  # the terminal window closed
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
