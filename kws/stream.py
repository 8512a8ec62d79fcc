"""Streaming detection: audio chunks in, keyword events out; one Detector for microphone, files and HTTP.

Audio of any chunk size goes in at 16 kHz. Each 20 ms hop adds one MFCC frame to the last
second's NUM_FRAMES frames (so a hop costs one frame, never a whole second again), and
every ``hop_frames`` hops the model scores that second. Scores become events the way TFLM's
micro_speech (RecognizeCommands) and microWakeWord do it: average each label's score over
the last ``average_ms``, fire when a keyword's average reaches its threshold with at
least ``min_count`` scores averaged, then stay quiet for ``suppression_ms``.

Every frame, score and average is computed the same way whatever the chunking (a chunk's
runs just go to the model in one call), so a file pushed at once, in 20 ms pieces or in
random pieces gives identical events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from kws.audio import AudioError, ModelRate, mono_samples
from kws.features import (
    CLIP_SAMPLES,
    HOP_SAMPLES,
    NUM_FRAMES,
    SAMPLE_RATE,
    SILENCE_FRAME,
    WINDOW_SAMPLES,
    frame_features,
    frames,
    num_frames,
)

if TYPE_CHECKING:  # runtime imports this module
    from kws.runtime import Model

HOP_MS = 1000 * HOP_SAMPLES / SAMPLE_RATE
CLIP_MS = 1000 * CLIP_SAMPLES / SAMPLE_RATE  # the model's window: no hop or average is longer
TIME_EPSILON = 1e-6  # stream times are float sums of hops: compare them with this slack
FA_TARGET_PER_HOUR = 0.5  # false accepts the thresholds are calibrated to: openWakeWord's target


@dataclass(frozen=True)
class DetectionConfig:
    """How scores become events; stored in the model's manifest by threshold calibration.

    Frozen, as a Detector reads it once (its ``thresholds`` too, though a dict cannot refuse a
    change): ``dataclasses.replace`` makes a changed copy, and ``detection_config`` starts from a
    model's calibrated settings.
    """

    # Run the model every hop_frames x 20 ms. On the validation stream, 80 ms found the same
    # keywords with the same false accepts as 40 ms and 20 ms (docs/model_variants.md) for
    # half or a quarter of the model runs.
    hop_frames: int = 4
    average_ms: float = 500.0
    min_count: int = 3
    # A word stays inside the 1 s window for up to a second after it fires, and the average
    # trails by average_ms: TFLM's micro_speech waits 1.5 s too.
    suppression_ms: float = 1500.0
    default_threshold: float = 0.8
    thresholds: dict[str, float] = field(default_factory=dict)  # per keyword, overriding the default

    def __post_init__(self):
        for name, low in (("hop_frames", 1), ("min_count", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}")
        for name in ("average_ms", "suppression_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a number of milliseconds, got {value!r}")
        # A longer hop leaves audio the model never scores; a longer average dilutes a keyword.
        if self.hop_frames * HOP_MS > CLIP_MS:
            raise ValueError(
                f"hop_frames must keep the hop within the model's {CLIP_MS:g} ms window (at most "
                f"{int(CLIP_MS // HOP_MS)}), got {self.hop_frames}"
            )
        if self.average_ms > CLIP_MS:
            raise ValueError(
                f"average_ms must be at most the model's {CLIP_MS:g} ms window, got {self.average_ms!r}"
            )
        for label, value in {"default_threshold": self.default_threshold, **self.thresholds}.items():
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(
                    f"the threshold of {label} must be a number, 0 or more (above 1: never), got {value!r}"
                )

    def threshold(self, label: str) -> float:
        return self.thresholds.get(label, self.default_threshold)

    @property
    def average_count(self) -> int:
        """How many consecutive model scores one average spans."""
        return max(1, round(self.average_ms / (HOP_MS * self.hop_frames)))

    def to_dict(self) -> dict:
        return asdict(self)


# Every model's labels besides its keywords: labels starting with "_" never fire.
SILENCE = "_silence_"
UNKNOWN = "_unknown_"


def keywords(labels: list[str]) -> list[str]:
    """The labels a Detector fires on: every label but _silence_ and _unknown_ (and any "_" label)."""
    return [label for label in labels if not label.startswith("_")]


def detection_config(manifest: dict, threshold: float | dict[str, float] | None = None) -> DetectionConfig:
    """The detection settings a model's manifest records; ``threshold`` overrides every keyword's,
    or, as {keyword: threshold}, those keywords' only. ValueError for settings the model cannot
    use, thresholds for labels it lacks among them."""
    config = DetectionConfig(**manifest.get("detection", {}))
    if isinstance(threshold, dict):
        config = replace(config, thresholds={**config.thresholds, **threshold})
    elif threshold is not None:
        config = replace(config, default_threshold=threshold, thresholds={})
    if "labels" in manifest:
        check_thresholds(config, manifest["labels"])
    return config


ENDED = "the stream was ended by flush(): call reset() to start a new one"


def check_thresholds(config: DetectionConfig, labels: list[str]) -> None:
    """ValueError if ``config`` sets thresholds for labels that are not keywords of the model."""
    unknown = sorted(set(config.thresholds) - set(keywords(labels)))
    if unknown:
        raise ValueError(
            f"thresholds for {', '.join(unknown)}, which are not keywords of this model "
            f"({', '.join(keywords(labels))})"
        )


@dataclass(frozen=True)
class Event:
    label: str
    score: float  # the averaged score that fired
    start: float  # seconds since the stream began: the model window that fired
    end: float

    @classmethod
    def fired(cls, label: str, score: float, end: float) -> Event:
        """The event of the model window that ends at ``end`` (s): its 1 s, cut at the stream's start."""
        return cls(label, score, max(0.0, end - CLIP_SAMPLES / SAMPLE_RATE), end)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "score": round(self.score, 6),  # thresholds reach 0.999999
            "start": round(self.start, 3),
            "end": round(self.end, 3),
        }

    def __str__(self) -> str:
        """One line for a terminal: window start and end (seconds), keyword, score."""
        return f"{self.start:8.2f} - {self.end:8.2f} s  {self.label:<10} {self.score:.4f}"

    def clamped(self, duration: float) -> Event:
        """The event with its times cut to a recording's length (for events the tail fired)."""
        return Event(self.label, self.score, min(self.start, duration), min(self.end, duration))


def duration(hours: float) -> str:
    """Hours as text: minutes under a tenth of an hour, which "0.00 h" would hide, seconds under one."""
    if hours >= 0.1:
        return f"{hours:.2f} h"
    return f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.1f} s"


def detections_text(counts: dict[str, int]) -> str:
    """Detections per keyword, as summaries print them: "3 detections (yes 2, no 1, up 0)"."""
    total = sum(counts.values())
    per_keyword = ", ".join(f"{label} {count}" for label, count in counts.items())
    return f"{total} detection{'s' * (total != 1)} ({per_keyword})"


class ScoreStream:
    """Audio chunks -> (end time, class scores) each time the model runs."""

    def __init__(self, model, hop_frames: int = 1):
        self.model = model
        self.hop_frames = hop_frames
        self.reset()

    def reset(self) -> None:
        # The last NUM_FRAMES frames, as the model's input wants them (int8). Starting from
        # digital silence lets a keyword in the first second be scored at once.
        silence = self.model.prepare(SILENCE_FRAME[None])[0]
        self._window = np.tile(silence, (NUM_FRAMES, 1))
        self._pending = np.zeros(0, np.float32)
        self._frame_count = 0

    def push(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model runs these samples complete: their end times (s) and class probabilities."""
        pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        # Frames wait for the one that ends a hop, as only model runs need them: a microphone
        # callback brings a frame or two, and computing a hop's frames in one call cuts a third
        # of a live stream's cost. frame_features gives each frame the same values however many
        # come together, so neither the chunking nor the waiting ever changes a score.
        complete = self._frame_count + num_frames(len(pending))
        count = complete - complete % self.hop_frames - self._frame_count
        if count <= 0:
            self._pending = pending
            return self.no_runs()
        self._pending = pending[count * HOP_SAMPLES :]
        new = self.model.prepare(frame_features(frames(pending, count)))
        series = np.concatenate([self._window, new])
        # _frame_count is a whole number of hops, so the runs end the new frames' hops.
        runs = np.arange(self.hop_frames - 1, count, self.hop_frames)
        ends = _frame_end(self._frame_count + 1 + runs)
        self._window = series[-NUM_FRAMES:]
        self._frame_count += count
        # Each run scores the NUM_FRAMES frames that end with its new frame; all in one call.
        windows = np.stack([series[run + 1 : run + 1 + NUM_FRAMES] for run in runs])
        return ends, self.model.probabilities(self.model.raw_scores(windows))

    def no_runs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(0), np.zeros((0, len(self.model.labels)), np.float32)


def _frame_end(number):
    """Stream time (s) at the end of frame ``number`` (from 1): one number or an array."""
    return ((number - 1) * HOP_SAMPLES + WINDOW_SAMPLES) / SAMPLE_RATE


class EventRules:
    """Scores over time -> events: moving average, per-keyword threshold, minimum count, suppression."""

    def __init__(self, labels: list[str], config: DetectionConfig):
        self.labels = labels
        self.config = config
        self.keywords = [labels.index(keyword) for keyword in keywords(labels)]
        self.thresholds = np.array([config.threshold(labels[i]) for i in self.keywords])
        self.reset()

    def reset(self) -> None:
        # The keyword scores of the last average_count - 1 runs; zeros before the first run
        # add nothing to a sum.
        self._history = np.zeros((self.config.average_count - 1, len(self.keywords)))
        self._seen = 0
        self._last_event_end = -np.inf

    def update(self, ends: np.ndarray, scores: np.ndarray) -> list[Event]:
        """The events of the next model runs: their end times (s) and class probabilities.

        stream_eval.keyword_events repeats these rules with array operations for one keyword, to
        sweep thresholds fast; a test holds the two equal.
        """
        count, runs = self.config.average_count, len(ends)
        if runs == 0:
            return []
        series = np.concatenate([self._history, np.asarray(scores)[:, self.keywords]])
        # Each average adds its scores oldest first, whatever runs came in the same call,
        # so batching the runs differently never changes an event.
        total = series[:runs].copy()
        for offset in range(1, count):
            total += series[offset : offset + runs]
        seen = self._seen + 1 + np.arange(runs)
        average = total / np.minimum(seen, count)[:, None]
        self._history = series[runs:]
        self._seen += runs
        margin = average - self.thresholds
        firing = np.flatnonzero((seen >= self.config.min_count) & (margin.max(axis=1, initial=-1) >= 0))
        events = []
        for run in firing:
            end = float(ends[run])
            if end < self._last_event_end + self.config.suppression_ms / 1000 - TIME_EPSILON:
                continue
            best = int(np.argmax(margin[run]))
            self._last_event_end = end
            events.append(Event.fired(self.labels[self.keywords[best]], float(average[run, best]), end))
        return events


class Detector:
    """Keyword events from a live or recorded stream of 16 kHz audio: ``push`` chunks of any size
    as they come, ``flush`` at the end, ``reset`` before another stream.

    Chunks are mono or (frames, channels), floats at full scale 1 or signed integer PCM
    (``audio.mono_samples``); at another rate, wrap the Detector in a ``RateDetector``. The
    events are the same however the audio is cut into chunks. One Detector is one stream, for
    one thread at a time; Detectors on several threads may share a Model.
    """

    def __init__(self, model: Model, config: DetectionConfig | None = None):
        self.model = model
        self.config = config or detection_config(model.manifest)
        self.labels = model.labels
        check_thresholds(self.config, self.labels)
        self._scores = ScoreStream(model, self.config.hop_frames)
        self._rules = EventRules(self.labels, self.config)
        self._samples = 0
        self._ended = False

    def reset(self) -> None:
        """Start a new stream: times from 0, nothing of the last stream's audio remembered."""
        self._scores.reset()
        self._rules.reset()
        self._samples = 0
        self._ended = False

    @property
    def seconds(self) -> float:
        """Audio pushed since the start (or ``reset``)."""
        return self._samples / SAMPLE_RATE

    def score(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Event]]:
        """The model runs the samples complete (end times, class probabilities) and their events."""
        if self._ended:
            raise RuntimeError(ENDED)
        samples = mono_samples(samples)
        self._samples += len(samples)
        ends, probabilities = self._scores.push(samples)
        return ends, probabilities, self._rules.update(ends, probabilities)

    def score_tail(self) -> tuple[np.ndarray, np.ndarray, list[Event]]:
        """``score`` for the end of the stream: silence that lets the averages over the last audio
        complete. Its events' times are cut to the audio pushed. It ends the stream: another
        call returns nothing."""
        if self._ended:
            return (*self._scores.no_runs(), [])
        self._ended = True
        tail_ms = self.config.average_ms + HOP_MS * self.config.hop_frames * (self.config.min_count + 1)
        ends, probabilities = self._scores.push(np.zeros(int(SAMPLE_RATE * tail_ms / 1000), np.float32))
        events = self._rules.update(ends, probabilities)
        return ends, probabilities, [event.clamped(self.seconds) for event in events]

    def push(self, samples: np.ndarray) -> list[Event]:
        """The events the next chunk of the stream completes (often none)."""
        return self.score(samples)[2]

    def flush(self) -> list[Event]:
        """The events of the stream's last audio, which later audio would have completed; it ends
        the stream."""
        return self.score_tail()[2]

    def detect(self, audio: np.ndarray) -> list[Event]:
        """All events of one recording, from a fresh start."""
        self.reset()
        return self.push(audio) + self.flush()


class RateDetector:
    """A Detector fed a live stream at its own sample rate (a microphone's, a WebSocket's): the
    events of the whole recording resampled at once, however the blocks come."""

    def __init__(self, detector: Detector, rate: float):
        self.detector = detector
        self.rate = rate
        self.reset()

    def reset(self) -> None:
        """Start a new stream, as Detector.reset does."""
        self.detector.reset()
        self._to_model_rate = ModelRate(self.rate)
        self._ended = False

    def push(self, block: np.ndarray) -> list[Event]:
        """Samples at the stream's rate, as Detector.push takes them -> the events they complete."""
        if self._ended:  # the resampler, drained, takes nothing more
            raise RuntimeError(ENDED)
        return self.detector.push(self._to_model_rate.convert(block))

    def flush(self) -> list[Event]:
        """The events of the stream's last audio, as Detector.flush ends a recording; it ends the
        stream: another call returns nothing."""
        if self._ended:
            return []
        self._ended = True
        return self.detector.push(self._to_model_rate.finish()) + self.detector.flush()


SCORED_CLIP_SECONDS = 1.5


def recording_report(
    detector: Detector, blocks: Iterable[np.ndarray], name: str, top_k: int | None = None, progress=None
) -> dict:
    """The JSON object of ``kws detect --json`` and ``POST /detect`` for one recording, given as
    blocks of samples in order (one block holding all of it, or ``audio.blocks`` of a file).

    Clips up to SCORED_CLIP_SECONDS long also get the class scores of their best window
    (the model run most confident in something other than silence), the ``top_k`` highest.
    ``progress`` (a tqdm bar) advances by the seconds of each block scored; the report is the
    same however the recording is cut into blocks. A recording whose decoder finds it damaged
    part way (an AudioError from ``blocks``, a FLAC copy cut short) gets the detections before
    the damage and ``"damaged"``: the reason; damaged before any audio, the AudioError is raised.
    """
    detector.reset()
    probabilities, events, damage = [], [], []
    for block in _until_damaged(blocks, damage):
        _, scores, found = detector.score(block)
        if detector.seconds <= SCORED_CLIP_SECONDS:  # kept for short clips only: length costs no memory
            probabilities.append(scores)
        events += found
        if progress is not None:
            progress.update(len(block) / SAMPLE_RATE)
    if damage and not detector.seconds:
        raise damage[0]
    _, scores, found = detector.score_tail()
    probabilities = np.concatenate([*probabilities, scores])
    events += found
    seconds = detector.seconds
    report = {
        "file": name,
        "duration": round(seconds, 3),
        "detections": [event.to_dict() for event in events],
        "model": detector.model.identity,
    }
    if damage:
        report["damaged"] = str(damage[0])
    if seconds <= SCORED_CLIP_SECONDS and len(probabilities):
        speech = [i for i, label in enumerate(detector.labels) if label != SILENCE]
        best = probabilities[np.argmax(probabilities[:, speech].max(axis=1))]
        order = np.argsort(-best)[:top_k]
        report["scores"] = {detector.labels[i]: round(float(best[i]), 4) for i in order}
    return report


def _until_damaged(blocks: Iterable[np.ndarray], damage: list) -> Iterable[np.ndarray]:
    """The blocks of a recording up to any that cannot be decoded, whose AudioError goes into
    ``damage``: what came before is still worth reporting."""
    try:
        yield from blocks
    except AudioError as error:
        damage.append(error)
