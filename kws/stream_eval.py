"""Measuring the Detector on long streams: recall per keyword, false accepts per hour, DET curve, thresholds.

The test stream is made of held-out material only: every validation keyword clip, spliced
at known times between validation clips of other words and stretches of held-out
negative speech, over a bed of held-out background noise. A detection is a hit when its
label matches a keyword whose clip overlaps the detection's 1 s window (give or take
MATCH_SLACK_S); every other detection, a second one on the same keyword included, is a
false accept. Real-speech false accepts are counted on the held-out negative speakers'
recordings alone, which hold no keyword at all. That is the speech the stream holds, scored
again clean and on its own: the two measures share their audio, so calibration counts the
stream's hours and false accepts only, and never adds the two.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from kws.data import DataError, SpeechData, to_float
from kws.evaluate import FEW_CLIPS, clip_counts, few_clips, percent
from kws.features import CLIP_SAMPLES, SAMPLE_RATE
from kws.stream import (
    TIME_EPSILON,
    UNKNOWN,
    DetectionConfig,
    Event,
    EventRules,
    ScoreStream,
    duration,
    keywords,
)

MATCH_SLACK_S = 0.25
GAP_S = (0.8, 2.5)  # silence-or-noise between items
SPEECH_STRETCH_S = (4.0, 12.0)
SPEECH_EVERY = 6  # a stretch of negative speech after about every 6 clips
NOISE_GAIN = (10**-3.0, 10**-1.0)  # background bed level range (noise peak ~0.001 .. 0.1)
CLIP_GAIN_DB = (-6.0, 6.0)
# Steps of 0.005 up to 0.99, then of a tenth of a decade of 1 - threshold up to 1 - 1e-6: the
# thresholds that keep false accepts rare lie close to 1, where softmax scores still resolve.
THRESHOLD_GRID = np.concatenate([np.arange(60, 198) / 200, np.round(1 - 10 ** -np.arange(2.0, 6.01, 0.1), 8)])


@dataclass
class Stream:
    audio: np.ndarray  # float32 at SAMPLE_RATE
    truth: list[tuple[str, float, float]]  # (keyword, start s, end s)

    @property
    def hours(self) -> float:
        return len(self.audio) / SAMPLE_RATE / 3600


@dataclass
class Scored:
    """A stream run through the model once: each run's end time and class probabilities."""

    ends: np.ndarray
    probabilities: np.ndarray
    hours: float


def build_stream(data: SpeechData, seed: int = 0) -> Stream:
    """The keyword test stream from the validation split, held-out speakers and held-out noise."""
    rng = np.random.default_rng(seed)
    clips = data.split_audio("validation")
    unknown = data.label_of(UNKNOWN)
    items = [("clip", i) for i in np.flatnonzero(clips.keyword | (clips.labels == unknown))]
    speech = _speech_stretches(data, rng)
    order = rng.permutation(len(items))
    sequence = []
    for position, index in enumerate(order):
        sequence.append(items[index])
        if speech and position % SPEECH_EVERY == SPEECH_EVERY - 1:
            sequence.append(("speech", speech.pop()))
    sequence += [("speech", stretch) for stretch in speech]
    if not sequence:
        raise DataError(
            f"nothing to build a test stream from: the validation split of {data.root} holds no clips "
            "(a test set package holds only test clips), and there is no --negatives speech; pass "
            "Speech Commands data with validation clips"
        )

    pieces, truth, cursor = [], [], 0
    for kind, item in sequence:
        gap = int(rng.uniform(*GAP_S) * SAMPLE_RATE)
        pieces.append(np.zeros(gap, np.float32))
        cursor += gap
        if kind == "clip":
            gain = 10 ** (rng.uniform(*CLIP_GAIN_DB) / 20)
            clip = np.clip(to_float(clips.samples[item]) * gain, -1, 1)
            if clips.keyword[item]:
                truth.append((clips.words[item], cursor / SAMPLE_RATE, (cursor + len(clip)) / SAMPLE_RATE))
        else:
            clip = item
        pieces.append(clip)
        cursor += len(clip)
    audio = np.concatenate(pieces)
    return Stream(np.clip(audio + _noise_bed(data, rng, len(audio)), -1, 1).astype(np.float32), truth)


def _speech_stretches(data: SpeechData, rng: np.random.Generator) -> list[np.ndarray]:
    """Held-out negative speech cut into stretches of a few seconds, every second used once."""
    if not data.negatives:
        return []
    stretches = []
    for track in data.negatives.tracks["held_out"]:
        start = 0
        while start < len(track):
            length = int(rng.uniform(*SPEECH_STRETCH_S) * SAMPLE_RATE)
            stretches.append(to_float(track[start : start + length]))
            start += length
    rng.shuffle(stretches)
    return stretches


def _noise_bed(data: SpeechData, rng: np.random.Generator, length: int) -> np.ndarray:
    """Held-out background noise under the whole stream, its level changing every 10 s."""
    if not data.noise:
        return np.zeros(length, np.float32)
    bed = np.zeros(length, np.float32)
    block = 10 * SAMPLE_RATE
    for start in range(0, length, block):
        size = min(block, length - start)
        gain = np.exp(rng.uniform(*np.log(NOISE_GAIN)))
        windows = data.noise.windows(rng, -(-size // CLIP_SAMPLES), "validation").reshape(-1)
        bed[start : start + size] = windows[:size] * gain
    return bed


def real_speech(data: SpeechData) -> np.ndarray:
    """All held-out negative speech back to back, as a reader goes from one passage to the
    next: an hour-scale recording without keywords, every second of it speech."""
    if not data.negatives or not data.negatives.tracks["held_out"]:
        return np.zeros(0, np.float32)
    return np.concatenate([to_float(track) for track in data.negatives.tracks["held_out"]])


def score(model, audio: np.ndarray, hop_frames: int, description: str = "scoring") -> Scored:
    """Run the streaming frontend and model over ``audio`` (mono float32 in [-1, 1], as a test
    stream is built) once, exactly as ``Detector.push`` does.

    Without the Detector's end-of-stream tail, so a keyword that ends the audio may go unfound.
    """
    stream = ScoreStream(model, hop_frames)
    ends, probabilities = [], []
    step = 10 * SAMPLE_RATE
    progress = tqdm(range(0, len(audio), step), desc=description, unit="10s", leave=False, disable=None)
    for start in progress:
        chunk_ends, chunk_probabilities = stream.push(audio[start : start + step])
        ends.append(chunk_ends)
        probabilities.append(chunk_probabilities)
    return Scored(
        np.concatenate([np.zeros(0), *ends]),
        np.concatenate([np.zeros((0, len(model.labels)), np.float32), *probabilities]),
        len(audio) / SAMPLE_RATE / 3600,
    )


def simulate(labels: list[str], scored: Scored, config: DetectionConfig) -> list:
    """The Detector's events for stored scores (the same EventRules, without rerunning the model)."""
    return EventRules(labels, config).update(scored.ends, scored.probabilities)


def _clip_times(truth: list[tuple[str, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Start and end times (s) of the keyword clips."""
    return np.array([t[1] for t in truth]), np.array([t[2] for t in truth])


def _overlapping(event, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Indices of the clips the event's window overlaps, give or take MATCH_SLACK_S."""
    return np.flatnonzero((starts - MATCH_SLACK_S < event.end) & (event.start < ends + MATCH_SLACK_S))


def match(events, truth: list[tuple[str, float, float]]) -> tuple[list[bool], list]:
    """Which keywords were found, and the false accepts."""
    found = [False] * len(truth)
    starts, ends = _clip_times(truth)
    false_accepts = []
    for event in events:
        # The event's window [start, end] must overlap the keyword's clip.
        overlapping = _overlapping(event, starts, ends)
        hit = next((i for i in overlapping if not found[i] and truth[i][0] == event.label), None)
        if hit is None:
            false_accepts.append(event)
        else:
            found[hit] = True
    return found, false_accepts


def false_accept_kinds(false_accepts, truth: list[tuple[str, float, float]]) -> dict[str, int]:
    """How many false accepts fell on another keyword (a substitution: "stop" heard as "up"), on
    the same keyword again (a repeat), or where no keyword was said.

    On a stream as dense with keywords as the test stream, substitutions are most false
    accepts; telling them apart says whether a threshold fights confusions or speech.
    """
    starts, ends = _clip_times(truth)
    kinds = {"substitution": 0, "repeat": 0, "no_keyword": 0}
    for event in false_accepts:
        said = {truth[i][0] for i in _overlapping(event, starts, ends)}
        kind = "no_keyword" if not said else "repeat" if event.label in said else "substitution"
        kinds[kind] += 1
    return kinds


def keyword_events(
    labels: list[str], scored: Scored, keyword: str, threshold: float, config: DetectionConfig
):
    """The events EventRules gives when only ``keyword`` may fire, computed with array operations.

    Equal to ``simulate`` with every other keyword's threshold out of reach, and fast enough
    to sweep a few hundred thresholds per keyword over hours of stream.
    """
    if not len(scored.ends):
        return []
    count = config.average_count
    series = scored.probabilities[:, labels.index(keyword)]
    cumulative = np.concatenate([[0.0], np.cumsum(series, dtype=np.float64)])
    index = np.arange(len(series))
    window = np.minimum(index + 1, count)
    average = (cumulative[index + 1] - cumulative[index + 1 - window]) / window
    eligible = np.flatnonzero((index + 1 >= config.min_count) & (average >= threshold))
    events, position = [], 0
    suppression = config.suppression_ms / 1000
    while position < len(eligible):
        i = eligible[position]
        end = float(scored.ends[i])
        events.append(Event.fired(keyword, float(average[i]), end))
        position = int(np.searchsorted(scored.ends[eligible], end + suppression - TIME_EPSILON))
    return events


def _hits(found: list[bool], truth: list[tuple[str, float, float]], keyword: str) -> list[bool]:
    """Whether each occurrence of ``keyword`` in the stream was found."""
    return [hit for hit, (label, _, _) in zip(found, truth, strict=True) if label == keyword]


def measure(
    labels: list[str], stream: Stream, scored: Scored, speech: Scored | None, config: DetectionConfig
) -> dict:
    """Recall per keyword and false accepts per hour on the stream and on real speech."""
    found, false_accepts = match(simulate(labels, scored, config), stream.truth)
    per_keyword = {}
    for keyword in keywords(labels):
        hits = _hits(found, stream.truth, keyword)
        per_keyword[keyword] = {
            "recall": round(float(np.mean(hits)), 4) if hits else None,
            "occurrences": len(hits),
            "false_accepts": sum(e.label == keyword for e in false_accepts),
            "threshold": config.threshold(keyword),
        }
    result = {
        "stream_hours": round(stream.hours, 3),
        "keywords": len(stream.truth),
        "recall": round(float(np.mean(found)), 4) if found else None,
        "false_accepts": len(false_accepts),
        "false_accepts_per_hour": round(len(false_accepts) / stream.hours, 3),
        "false_accept_kinds": false_accept_kinds(false_accepts, stream.truth),
        "per_keyword": per_keyword,
    }
    if speech is not None and speech.hours > 0:
        speech_events = simulate(labels, speech, config)
        result["real_speech"] = {
            "hours": round(speech.hours, 3),
            "false_accepts": len(speech_events),
            "false_accepts_per_hour": round(len(speech_events) / speech.hours, 3),
            "by_keyword": {k: sum(e.label == k for e in speech_events) for k in keywords(labels)},
        }
    return result


def sweep(
    labels: list[str], stream: Stream, scored: Scored, speech: Scored | None, config: DetectionConfig
) -> dict:
    """Per keyword and threshold: (threshold, recall, false accepts on the stream, on real speech)."""
    table = {}
    for keyword in keywords(labels):
        rows = []
        for threshold in THRESHOLD_GRID:
            events = keyword_events(labels, scored, keyword, float(threshold), config)
            found, false_accepts = match(events, stream.truth)
            hits = _hits(found, stream.truth, keyword)
            speech_fa = (
                len(keyword_events(labels, speech, keyword, float(threshold), config)) if speech else 0
            )
            rows.append(
                (float(threshold), float(np.mean(hits)) if hits else 0.0, len(false_accepts), speech_fa)
            )
        table[keyword] = rows
    return table


def false_accept_budget(target_per_hour: float, hours: float) -> int:
    """The false accepts a target allows over ``hours``: whole ones, as a stream has."""
    return int(target_per_hour * hours + 1e-9)


def calibrate(sweep_table: dict, hours: float, target_per_hour: float) -> dict[str, float]:
    """Per keyword, the threshold that finds the most keywords (mean recall over keywords)
    while all false accepts on the stream together stay within ``target_per_hour`` over its
    ``hours``: the budget goes where it buys the most recall. The real speech is not counted:
    the stream holds it already.

    Of thresholds with equal recall and false accepts, the lowest, kinder to speakers the
    stream lacks; but of those that find none of a keyword, the highest, as a lower one could
    only fire wrongly (a warning says the keyword is never found). The false accepts a
    keyword makes even at the highest threshold tried are outside the budget: it may spend
    the budget on what it costs beyond them.
    """
    budget = false_accept_budget(target_per_hour, hours)
    plans = {0: (0.0, {})}  # false accepts spent -> (recall summed, thresholds so far)
    for keyword, rows in sweep_table.items():
        unavoidable = min(stream_fa for _, _, stream_fa, _ in rows)
        options = {}  # false accepts -> (threshold, recall): the best recall at that cost
        for threshold, recall, stream_fa, _ in rows:
            cost = stream_fa - unavoidable
            if cost <= budget and (
                cost not in options or recall > options[cost][1] or recall == options[cost][1] == 0
            ):
                options[cost] = (threshold, recall)
        extended = {}
        for spent, (total, chosen) in plans.items():
            for cost, (threshold, recall) in options.items():
                if spent + cost <= budget and total + recall > extended.get(spent + cost, (-1.0,))[0]:
                    extended[spent + cost] = (total + recall, {**chosen, keyword: threshold})
        plans = extended
    # The most recall; of equal plans, the one with the fewest false accepts.
    return max(plans.items(), key=lambda item: (item[1][0], -item[0]))[1][1]


def det_points(sweep_table: dict, stream: Stream, speech: Scored | None) -> list[dict]:
    """One point per threshold (the same for every keyword): recall, false accepts per hour."""
    occurrences = {k: sum(t[0] == k for t in stream.truth) for k in sweep_table}
    total = max(1, sum(occurrences.values()))
    points = []
    for i, threshold in enumerate(THRESHOLD_GRID):
        rows = {k: table[i] for k, table in sweep_table.items()}
        points.append(
            {
                "threshold": float(threshold),
                "recall": sum(rows[k][1] * occurrences[k] for k in rows) / total,
                "stream_fa_per_hour": sum(r[2] for r in rows.values()) / stream.hours,
                "speech_fa_per_hour": sum(r[3] for r in rows.values()) / speech.hours if speech else None,
            }
        )
    return points


def stream_test(
    model, data: SpeechData, config: DetectionConfig, target_per_hour: float | None = None, det: bool = False
) -> tuple[DetectionConfig, dict]:
    """Score the test stream and the real speech once; optionally calibrate thresholds to a
    false-accept target and sweep the DET curve; measure the (calibrated) config.

    Returns the config measured and the report (with "det" points when asked or calibrating).
    """
    stream, speech_audio = build_stream(data), real_speech(data)
    calibrating = target_per_hour is not None  # 0 is a target too: no false accept at all
    said = {keyword for keyword, _, _ in stream.truth}
    if calibrating and not said:
        raise DataError(
            f"the validation split of {data.root} holds none of the model's keywords "
            f"({', '.join(keywords(model.labels))}): there is nothing to calibrate on; pass data with "
            "their clips"
        )
    scored = score(model, stream.audio, config.hop_frames, "test stream")
    speech = score(model, speech_audio, config.hop_frames, "real speech") if len(speech_audio) else None
    table = sweep(model.labels, stream, scored, speech, config) if det or calibrating else None
    if calibrating:
        # A keyword the stream never says would get the lowest threshold without a false
        # accept, whatever it finds: it keeps the threshold it had (and a warning says so).
        calibrated = calibrate(
            {k: rows for k, rows in table.items() if k in said}, stream.hours, target_per_hour
        )
        config = replace(config, thresholds={**config.thresholds, **calibrated})
    report = measure(model.labels, stream, scored, speech, config)
    report["warnings"] = warn(report, stream.hours, target_per_hour, without_negatives=not data.negatives)
    if table is not None:
        report["det"] = det_points(table, stream, speech)
    return config, report


def warn(
    report: dict, hours: float, target_per_hour: float | None = None, without_negatives: bool = False
) -> list[str]:
    """Say what a stream test's figures cannot show: no real speech (``without_negatives``), keywords the
    stream never says or says on few clips; and, for thresholds calibrated to
    ``target_per_hour``, a stream of ``hours`` too short for the target, a target not met, and
    keywords never found. Printed, and returned for the manifest and the model card."""
    warnings = []
    if without_negatives:  # negatives with no speaker held out are the NegativeBank's warning
        warnings.append(
            "no keyword-free speech was measured (no --negatives), so the false accepts are those of "
            "clips and noise alone: continuous speech makes a keyword model fire far more often; "
            "measure and calibrate with recordings that hold no keyword, such as LibriSpeech (kws "
            "eval --stream --negatives DIR, kws calibrate --negatives DIR)"
        )
    per_keyword = report["per_keyword"]
    firing = {k: row["false_accepts"] for k, row in per_keyword.items() if row["false_accepts"]}
    unsaid = [k for k, row in per_keyword.items() if not row["occurrences"]]
    if unsaid:
        kept = ", ".join(f"{keyword} {per_keyword[keyword]['threshold']:g}" for keyword in unsaid)
        unsaid_firing = {k: count for k, count in firing.items() if k in unsaid}
        warnings.append(
            f"the test stream never says {', '.join(unsaid)}: recall not measured"
            + ("" if target_per_hour is None else f", thresholds kept as they were ({kept})")
            + (f", false accepts on it ({_counts(unsaid_firing)})" if unsaid_firing else "")
            + "; give the validation split clips of each"
        )
    thin = few_clips({keyword: row["occurrences"] for keyword, row in per_keyword.items()})
    if thin:
        warnings.append(
            f"the test stream holds few clips of {clip_counts(thin)}, so their recall and "
            f"thresholds may not hold for other speakers: give the validation split {FEW_CLIPS} or "
            "more clips of each keyword, from several speakers"
        )
    if target_per_hour is not None:
        warnings += _threshold_warnings(report, hours, target_per_hour, firing, unsaid)
    for warning in warnings:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    return warnings


def _threshold_warnings(
    report: dict, hours: float, target_per_hour: float, firing: dict, unsaid: list
) -> list[str]:
    warnings = []
    budget = false_accept_budget(target_per_hour, hours)
    calibrated = {k: count for k, count in firing.items() if k not in unsaid}
    if sum(calibrated.values()) > budget:
        warnings.append(
            f"the calibrated thresholds let {sum(calibrated.values())} false accepts through on the test "
            f"stream, over the {target_per_hour:g} per hour asked: some keywords fire wrongly even at the "
            f"highest threshold tried ({_counts(calibrated)}); train longer, or with more --negatives"
        )
    if target_per_hour > 0 and not budget:
        warnings.append(
            # Rounded as the report stores them, so that its line and this one say the same length.
            f"the test stream lasts {duration(round(hours, 3))}, too short to measure "
            f"{target_per_hour:g} false accepts per hour (that takes {1 / target_per_hour:g} h), so "
            "calibration allowed none, and may miss keywords it need not: calibrate on more "
            "validation clips, or more keyword-free speech (kws calibrate --negatives DIR), or to a "
            "target this stream can show (kws calibrate --target-fa)"
        )
    speech = report.get("real_speech")
    if speech and speech["false_accepts"] and speech["false_accepts_per_hour"] > target_per_hour:
        firing_in_speech = {k: count for k, count in speech.get("by_keyword", {}).items() if count}
        warnings.append(
            f"in the real speech without keywords ({duration(speech['hours'])}), played whole rather "
            f"than in stretches amid the test stream's noise and keywords, the calibrated thresholds fire "
            f"{speech['false_accepts']} times ({speech['false_accepts_per_hour']:.2f} per hour"
            + (f": {_counts(firing_in_speech)}" if firing_in_speech else "")
            + f"), over the {target_per_hour:g} per hour asked: continuous speech fires them more often "
            "than the test stream shows; train with more --negatives, or raise those keywords' thresholds"
        )
    for keyword, row in report["per_keyword"].items():
        if row["recall"] == 0:
            warnings.append(
                f"at {target_per_hour:g} false accepts per hour, the calibrated thresholds find "
                f"none of the {row['occurrences']} {keyword!r} in the test stream, so it would never fire: "
                "train longer or on more clips of it, or calibrate to a higher --target-fa"
            )
    return warnings


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{keyword!r} {count}" for keyword, count in counts.items())


def format_stream_report(report: dict) -> str:
    """Human-readable text of a stream test."""
    lines = [
        f"test stream {duration(report['stream_hours'])}, {report['keywords']} keywords: recall "
        f"{percent(report['recall'])}, {_false_accepts(report['false_accepts'])} "
        f"({report['false_accepts_per_hour']:.2f} per hour)"
    ]
    if report["false_accepts"]:
        kinds = report["false_accept_kinds"]
        lines.append(
            f"  of the false accepts: {kinds['substitution']} on another keyword, {kinds['repeat']} on "
            f"the same keyword again, {kinds['no_keyword']} where no keyword was said"
        )
    if "real_speech" in report:
        speech = report["real_speech"]
        lines.append(
            f"real speech without keywords {duration(speech['hours'])}: "
            f"{_false_accepts(speech['false_accepts'])} ({speech['false_accepts_per_hour']:.2f} per hour)"
        )
    lines.append(f"{'keyword':<10} {'threshold':>9} {'recall':>7} {'found':>9} {'false accepts':>14}")
    for keyword, row in report["per_keyword"].items():
        found = f"{round((row['recall'] or 0.0) * row['occurrences'])}/{row['occurrences']}"
        lines.append(
            f"{keyword:<10} {row['threshold']:9.6g} {percent(row['recall']):>7} {found:>9} "
            f"{row['false_accepts']:14d}"
        )
    return "\n".join(lines)


def _false_accepts(count: int) -> str:
    return f"{count} false accept{'s' * (count != 1)}"
