"""The streaming Detector: chunking never changes events, incremental equals naive, the event rules."""

import ast
import concurrent.futures
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import WORD_TONES, readme_code, tone

from kws import stream_eval
from kws.audio import MAX_FLOAT_PEAK, AudioError, load
from kws.cli import main
from kws.features import CLIP_SAMPLES, HOP_SAMPLES, SAMPLE_RATE, WINDOW_SAMPLES, mfcc
from kws.runtime import BUILT_IN_MODEL, MANIFEST_FILE, Model
from kws.stream import (
    DetectionConfig,
    Detector,
    Event,
    EventRules,
    ScoreStream,
    detection_config,
    duration,
    recording_report,
)

LABELS = ["_silence_", "_unknown_", "yes", "no"]


def tone_recording(words, gap_s=1.2, seed=0):
    """Tone 'words' separated by quiet gaps, with the times of each word's clip."""
    rng = np.random.default_rng(seed)
    pieces, truth, cursor = [], [], 0
    for i, word in enumerate(words):
        gap = (0.003 * rng.standard_normal(int(gap_s * SAMPLE_RATE))).astype(np.float32)
        pieces += [gap, tone(WORD_TONES[word], seed=100 + i)]
        cursor += len(gap)
        truth.append((word, cursor / SAMPLE_RATE, (cursor + CLIP_SAMPLES) / SAMPLE_RATE))
        cursor += CLIP_SAMPLES
    pieces.append(np.zeros(SAMPLE_RATE // 2, np.float32))
    return np.concatenate(pieces), truth


@pytest.fixture(scope="module")
def model(tone_export):
    return Model.load(tone_export[0])


def push_in_chunks(detector, audio, sizes):
    detector.reset()
    events, start = [], 0
    for size in sizes:
        events += detector.push(audio[start : start + size])
        start += size
    return events + detector.flush()


def test_one_file_three_ways_gives_identical_events(model):
    audio, truth = tone_recording(["yes", "no", "up", "down", "yes"])
    detector = Detector(model, DetectionConfig(default_threshold=0.6))
    whole = push_in_chunks(detector, audio, [len(audio)])
    hops = push_in_chunks(detector, audio, [320] * (len(audio) // 320 + 1))
    rng = np.random.default_rng(0)
    random_sizes = rng.integers(1, 4000, size=len(audio)).tolist()
    scattered = push_in_chunks(detector, audio, random_sizes)
    assert whole == hops == scattered  # Event equality: labels, scores, times, exactly
    assert len(whole) >= 4
    found, false_accepts = stream_eval.match(whole, truth)
    assert sum(found) >= 4 and len(false_accepts) <= 1
    assert all(e.end - 1.0 == pytest.approx(e.start) for e in whole)


def test_int16_int32_stereo_and_float_chunks_give_the_same_events(model):
    audio, _ = tone_recording(["yes", "no", "up"])
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)  # as a sound card gives it
    as_float = pcm / np.float32(32768)
    detector = Detector(model, DetectionConfig(default_threshold=0.6))
    expected = push_in_chunks(detector, as_float, [320] * (len(pcm) // 320 + 1))
    assert len(expected) >= 2
    for chunk in (pcm, pcm.astype(np.int32) << 16, np.stack([as_float, as_float], axis=1), as_float[:, None]):
        assert push_in_chunks(detector, chunk, [320] * (len(pcm) // 320 + 1)) == expected
        assert detector.seconds == len(pcm) / SAMPLE_RATE


@pytest.mark.parametrize(
    "chunk, error, message",
    [
        (b"\x00\x01" * 320, TypeError, "np.frombuffer(data, '<i2')"),
        (np.zeros(320, np.uint8), TypeError, "of type uint8: pass floats at full scale 1 or signed integer"),
        ([0] * 320, TypeError, "of type int64"),  # Python ints: PCM of which width?
        (np.zeros((2, 16_000), np.float32), AudioError, "pass its transpose (.T)"),
        (np.zeros((320, 2, 2), np.float32), AudioError, "pass (frames,) or (frames, channels)"),
        (np.float32(0.5), AudioError, "of shape ()"),
        (np.array([0.1, np.nan] * 160, np.float32), AudioError, "NaN or infinite"),
        # int16 PCM made floats unscaled: clipped to full scale, it would be noise and find nothing.
        (np.array([12.0, -3000.0] * 160, np.float32), AudioError, "reach 3000, 70 dB over the full scale"),
    ],
)
def test_chunks_a_detector_cannot_use_are_refused_saying_what_to_pass(model, chunk, error, message):
    detector = Detector(model)
    with pytest.raises(error) as raised:
        detector.push(chunk)
    assert message in str(raised.value)
    assert detector.seconds == 0 and detector.push(np.zeros(320, np.float32)) == []  # nothing half-taken


def test_samples_beyond_full_scale_are_clipped_as_a_converter_would(model):
    audio, _ = tone_recording(["yes", "no"])
    loud = MAX_FLOAT_PEAK * audio / np.abs(audio).max()  # 12 dB over full scale: still floats at scale 1
    detector = Detector(model, DetectionConfig(default_threshold=0.6))
    assert detector.detect(loud) == detector.detect(np.clip(loud, -1, 1)) != []


def test_flush_ends_the_stream_until_reset(model):
    audio, _ = tone_recording(["yes", "no"])
    detector = Detector(model, DetectionConfig(default_threshold=0.6))
    expected = detector.detect(audio)
    seconds = detector.seconds
    assert detector.flush() == [] and detector.seconds == seconds  # a second flush: nothing, no time
    with pytest.raises(RuntimeError, match=r"ended by flush\(\): call reset\(\)"):
        detector.push(audio)
    detector.reset()
    assert detector.push(audio) + detector.flush() == expected


def test_a_config_is_frozen_and_its_thresholds_must_name_keywords(model):
    config = DetectionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default_threshold = 0.1  # a Detector would never see it
    with pytest.raises(ValueError, match=r"thresholds for yess, which are not keywords of this model \("):
        Detector(model, DetectionConfig(thresholds={"yess": 0.5}))


def test_detectors_on_several_threads_may_share_a_model(tone_export):
    shared = Model.load(tone_export[0])
    audio, _ = tone_recording(["yes", "no", "up"])
    config = DetectionConfig(default_threshold=0.6)
    expected = Detector(shared, config).detect(audio)
    assert len(expected) >= 2

    def listen():
        detector = Detector(shared, config)
        return push_in_chunks(detector, audio, [320] * (len(audio) // 320 + 1))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [future.result() for future in [pool.submit(listen) for _ in range(8)]]
    assert results == [expected] * 8


def test_model_scores_take_mfcc_windows_and_name_the_shape_audio_has(model):
    assert model.scores(mfcc(np.zeros(CLIP_SAMPLES, np.float32))).shape == (1, len(model.labels))
    with pytest.raises(ValueError, match=r"MFCC windows of shape \(n, 49, 10\), got \(16000,\): for audio"):
        model.scores(np.zeros(CLIP_SAMPLES, np.float32))


def test_incremental_frames_score_like_a_full_recompute(model):
    audio, _ = tone_recording(["yes", "up"])
    stream = ScoreStream(model, hop_frames=1)
    ends, scores = stream.push(audio)
    for end, probabilities in zip(ends[60::17], scores[60::17], strict=True):
        stop = int(round(end * SAMPLE_RATE))
        naive = model.scores(mfcc(audio[stop - CLIP_SAMPLES : stop]))[0]
        # An input step of difference moves a logit by a step or two; a log-probability moves by
        # its logit's change and the log-sum-exp's.
        step = model.tensor_spec("output")["scale"]
        np.testing.assert_allclose(np.log(probabilities), np.log(naive), atol=4 * step)
    assert len(ends) == len(scores) == 1 + (len(audio) - 640) // 320


def test_hop_frames_runs_the_model_every_nth_hop(model):
    audio, _ = tone_recording(["no"])
    (every, every_scores), (second, second_scores) = (
        ScoreStream(model, 1).push(audio),
        ScoreStream(model, 2).push(audio),
    )
    assert len(second) == len(every) // 2
    assert second.tolist() == every[1::2].tolist()
    np.testing.assert_array_equal(second_scores, every_scores[1::2])


def test_a_run_comes_with_the_sample_that_completes_its_hop(model):
    # Frames wait for the one that ends a hop; the model run must not wait any longer.
    stream = ScoreStream(model, hop_frames=4)
    hop_end = 3 * HOP_SAMPLES + WINDOW_SAMPLES  # the 4th frame's last sample
    audio = np.random.default_rng(0).normal(0, 0.1, 2 * hop_end).astype(np.float32)
    ends, _ = stream.push(audio[: hop_end - 1])
    assert len(ends) == 0
    ends, scores = stream.push(audio[hop_end - 1 : hop_end])
    assert ends.tolist() == [pytest.approx(hop_end / SAMPLE_RATE)] and scores.shape == (1, len(model.labels))
    ends, _ = stream.push(audio[hop_end : hop_end + 4 * HOP_SAMPLES])
    assert ends.tolist() == [pytest.approx((hop_end + 4 * HOP_SAMPLES) / SAMPLE_RATE)]


def rules(config):
    return EventRules(LABELS, config)


def feed(rule, sequence, step=0.02):
    """Scores one run at a time, as a live stream gives them."""
    events = []
    for i, scores in enumerate(sequence):
        events += rule.update(np.array([(i + 1) * step]), np.array([scores], float))
    return events


def test_rules_average_then_threshold_per_keyword():
    config = DetectionConfig(
        hop_frames=1, average_ms=60, min_count=3, suppression_ms=0, thresholds={"no": 0.9}
    )
    quiet, yes = [1, 0, 0, 0], [0, 0, 1, 0]
    # one loud frame is not enough: the average of 3 must reach 0.8
    assert feed(rules(config), [quiet, quiet, yes, quiet, quiet]) == []
    events = feed(rules(config), [quiet, yes, yes, yes])
    assert [(e.label, e.score, round(e.end, 2)) for e in events] == [("yes", 1.0, 0.08)]
    # "no" has its own, higher threshold: 0.85 average does not fire it
    assert feed(rules(config), [[0.15, 0, 0, 0.85]] * 4) == []
    # Before a window of 5 has filled, the average is over the runs seen, not over 5.
    warming = DetectionConfig(hop_frames=1, average_ms=100, min_count=2, suppression_ms=0)
    assert warming.average_count == 5
    events = feed(rules(warming), [yes, yes])
    assert [(e.label, e.score, round(e.end, 2)) for e in events] == [("yes", 1.0, 0.04)]
    # The keyword that fires is the one furthest over its own threshold, not the highest score.
    strict = DetectionConfig(
        hop_frames=1, average_ms=20, min_count=1, suppression_ms=0, thresholds={"yes": 0.3, "no": 0.9}
    )
    events = feed(rules(strict), [[0, 0, 0.35, 0.65]])
    assert [(e.label, e.score, round(e.end, 2)) for e in events] == [("yes", 0.35, 0.02)]


def test_rules_wait_for_min_count_and_then_suppress():
    config = DetectionConfig(hop_frames=1, average_ms=20, min_count=3, suppression_ms=100)
    yes = [0, 0, 1, 0]
    events = feed(rules(config), [yes] * 12)
    # first possible at the 3rd score (0.06 s); then quiet for 100 ms: next at 0.16 s
    assert [round(e.end, 2) for e in events] == [0.06, 0.16]


@pytest.mark.parametrize("hop_frames, average_ms, count", [(1, 100, 5), (4, 500, 6)])
def test_vectorised_single_keyword_events_equal_the_rules(model, hop_frames, average_ms, count):
    audio, _ = tone_recording(["yes", "no", "yes", "up", "no"], gap_s=0.6, seed=3)
    scored = stream_eval.score(model, audio, hop_frames=hop_frames)
    # A run every 20 ms or 80 ms, several averaged: the sweep must average as the rules do.
    config = DetectionConfig(hop_frames=hop_frames, average_ms=average_ms, min_count=3, suppression_ms=700)
    assert config.average_count == count
    fired = 0
    for keyword in ("yes", "no"):
        for threshold in (0.3, 0.6, 0.9):
            others = {label: 2.0 for label in model.labels if not label.startswith("_")}
            single = DetectionConfig(**{**config.to_dict(), "thresholds": {**others, keyword: threshold}})
            expected = stream_eval.simulate(model.labels, scored, single)
            fast = stream_eval.keyword_events(model.labels, scored, keyword, threshold, config)
            assert [(e.label, e.end) for e in fast] == [(e.label, e.end) for e in expected]
            np.testing.assert_allclose([e.score for e in fast], [e.score for e in expected], rtol=1e-6)
            fired += len(fast)
    assert fired >= 8  # each keyword, said twice, fires at the low thresholds at least


def test_calibration_spends_the_false_accept_budget_where_it_buys_most_recall():
    # rows: (threshold, recall, false accepts on the stream, on real speech)
    table = {
        "yes": [(0.5, 0.9, 3, 0), (0.9, 0.8, 1, 0), (0.99, 0.6, 0, 0), (0.999, 0.6, 0, 0)],
        # The real speech's false accepts do not count: the stream holds that speech already.
        "no": [(0.5, 0.9, 1, 4), (0.9, 0.5, 0, 2), (0.99, 0.2, 0, 0)],
        "up": [(0.5, 0.9, 9, 0), (0.99, 0.7, 5, 0)],  # over these budgets even at its top threshold
    }
    # 1 false accept in 2 h at 0.5 per hour: "no" gains 0.4 with it, "yes" only 0.2
    assert stream_eval.calibrate(table, 2.0, 0.5) == {"yes": 0.99, "no": 0.5, "up": 0.99}
    assert stream_eval.calibrate(table, 2.0, 1.0) == {"yes": 0.9, "no": 0.5, "up": 0.99}
    assert stream_eval.calibrate(table, 2.0, 0.1) == {"yes": 0.99, "no": 0.9, "up": 0.99}
    assert stream_eval.calibrate(table, 2.0, 100) == {"yes": 0.5, "no": 0.5, "up": 0.5}
    # Both fire once even at their top threshold; the budget of one buys "no" its 0.4 more.
    stubborn = {
        "yes": [(0.5, 0.9, 3, 0), (0.999, 0.6, 1, 0)],
        "no": [(0.5, 0.9, 2, 0), (0.999, 0.5, 1, 0)],
    }
    assert stream_eval.calibrate(stubborn, 2.1, 0.5) == {"yes": 0.999, "no": 0.5}
    # "go" is found at no threshold: a low one could only fire wrongly, on speech the stream lacks.
    unheard = {**table, "go": [(0.3, 0.0, 0, 0), (0.5, 0.0, 0, 0), (0.999, 0.0, 0, 0)]}
    assert stream_eval.calibrate(unheard, 2.0, 0.5) == {"yes": 0.99, "no": 0.5, "up": 0.99, "go": 0.999}
    # ... and at a budget too small to find any: the highest threshold within it.
    costly = {**table, "go": [(0.3, 0.9, 1, 0), (0.5, 0.0, 0, 0), (0.9, 0.0, 0, 0)]}
    assert stream_eval.calibrate(costly, 1.9, 0.5)["go"] == 0.9
    found_low = {"go": [(0.3, 0.4, 0, 0), (0.9, 0.0, 0, 0)]}  # some recall beats none at any threshold
    assert stream_eval.calibrate(found_low, 1.9, 0.5) == {"go": 0.3}


def test_calibration_warns_of_audio_too_short_thresholds_on_few_clips_and_keywords_never_found(capsys):
    few = stream_eval.FEW_CLIPS - 1
    report = {
        "per_keyword": {
            "yes": {"occurrences": few, "recall": 0.9, "false_accepts": 0, "threshold": 0.9},
            "no": {
                "occurrences": stream_eval.FEW_CLIPS,
                "recall": 0.0,
                "false_accepts": 0,
                "threshold": 0.99,
            },
            # not in the stream: not calibrated
            "up": {"occurrences": 0, "recall": None, "false_accepts": 0, "threshold": 0.8},
        },
        "real_speech": {"hours": 0.3, "false_accepts": 0},
    }
    stream_eval.warn(report, 2.0, 0.5)  # long enough for one false accept
    unsaid, thin, never = capsys.readouterr().err.splitlines()
    assert unsaid == (
        "warning: the test stream never says up: recall not measured, thresholds kept as they were "
        "(up 0.8); give the validation split clips of each"
    )
    assert thin.startswith(f"warning: the test stream holds few clips of 'yes' ({few}), so their recall and")
    assert "'no'" not in thin and "'up'" not in thin
    assert f"none of the {stream_eval.FEW_CLIPS} 'no'" in never and "never fire" in never
    stream_eval.warn(report, 1.9996, 0.5)  # a budget of none, as calibrate() has
    assert stream_eval.false_accept_budget(0.5, 1.9996) == 0
    short = capsys.readouterr().err.splitlines()[2]
    assert short.startswith("warning: the test stream lasts 2.00 h, too short to measure 0.5")
    # 0.2649 h is stored as 0.265 h, which the report line prints as 0.27 h: this line too.
    stream_eval.warn(report, 0.2649, 0.5)
    assert "the test stream lasts 0.27 h," in capsys.readouterr().err
    stream_eval.warn(report, 0.5, 0)  # no false accept at all: what any length measures
    assert len(capsys.readouterr().err.splitlines()) == 3
    # "yes" fires twice even at the highest threshold: the target is not met, and it says so.
    report["per_keyword"]["yes"]["false_accepts"] = 2
    stream_eval.warn(report, 2.0, 0.5)
    unmet = capsys.readouterr().err.splitlines()[2]
    assert unmet.startswith(
        "warning: the calibrated thresholds let 2 false accepts through on the test stream"
    )
    assert "over the 0.5 per hour asked" in unmet and "('yes' 2)" in unmet and "'no'" not in unmet
    # The real speech, left out of calibration, is over the target: said, with the keywords firing.
    report["per_keyword"]["yes"]["false_accepts"] = 0
    report["real_speech"] = {"hours": 0.3, "false_accepts": 2, "false_accepts_per_hour": 6.667}
    report["real_speech"]["by_keyword"] = {"yes": 0, "no": 2, "up": 0}
    stream_eval.warn(report, 2.0, 0.5)
    speech = capsys.readouterr().err.splitlines()[-2]  # before "no" found none
    assert speech.startswith(
        "warning: in the real speech without keywords (0.30 h), played whole rather than"
    )
    assert "thresholds fire 2 times (6.67 per hour: 'no' 2), over the 0.5 per hour asked" in speech
    report["real_speech"].update(false_accepts=0, false_accepts_per_hour=0.0)
    assert not any("real speech" in warning for warning in stream_eval.warn(report, 2.0, 0.5))
    report["real_speech"].update(hours=3.0, false_accepts=1, false_accepts_per_hour=0.333)  # under it
    assert not any("real speech" in warning for warning in stream_eval.warn(report, 2.0, 0.5))
    report["real_speech"].update(hours=0.0, false_accepts=1, false_accepts_per_hour=2000.0)  # 1.8 s, rounded
    assert any("real speech" in warning for warning in stream_eval.warn(report, 2.0, 0.5))
    capsys.readouterr()
    # "up", never said, was not calibrated: its false accepts are its own warning, not the budget's.
    report["per_keyword"]["yes"]["false_accepts"], report["per_keyword"]["up"]["false_accepts"] = 1, 3
    assert stream_eval.warn(report, 2.0, 0.5)[0] == (
        "the test stream never says up: recall not measured, thresholds kept as they were (up 0.8), "
        "false accepts on it ('up' 3); give the validation split clips of each"
    )


def test_a_stream_test_warns_of_what_its_figures_cannot_show_without_calibrating(capsys):
    report = {
        "per_keyword": {
            "yes": {"occurrences": 3, "recall": 0.0, "false_accepts": 0, "threshold": 0.8},
            "no": {"occurrences": 0, "recall": None, "false_accepts": 0, "threshold": 0.8},
        },
    }
    speechless, unsaid, thin = stream_eval.warn(report, 0.004, without_negatives=True)  # eval --stream
    assert speechless.startswith("no keyword-free speech was measured (no --negatives), so the false accepts")
    assert (
        unsaid
        == "the test stream never says no: recall not measured; give the validation split clips of each"
    )
    assert thin.startswith("the test stream holds few clips of 'yes' (3)")
    assert capsys.readouterr().err.splitlines() == [f"warning: {line}" for line in (speechless, unsaid, thin)]
    assert [duration(hours) for hours in (0.004, 0.05, 1.811)] == ["14.4 s", "3.0 min", "1.81 h"]
    assert stream_eval.warn(report, 0.004) == [
        unsaid,
        thin,
    ]  # --negatives given: its speech is its own warning


def test_match_counts_hits_once_and_everything_else_as_false_accepts():
    truth = [("yes", 10.0, 11.0), ("no", 20.0, 21.0)]
    events = [
        Event("yes", 0.9, 10.3, 11.3),  # hit
        Event("yes", 0.9, 10.9, 11.9),  # a second trigger on the same word: false accept
        Event("yes", 0.9, 19.5, 20.5),  # wrong word: false accept
        Event("up", 0.9, 40.0, 41.0),  # nothing there: false accept
    ]
    found, false_accepts = stream_eval.match(events, truth)
    assert found == [True, False] and len(false_accepts) == 3
    kinds = stream_eval.false_accept_kinds(false_accepts, truth)
    assert kinds == {"substitution": 1, "repeat": 1, "no_keyword": 1}
    # A window that ends up to MATCH_SLACK_S (0.25 s) before the clip starts still found it.
    assert stream_eval.match([Event("no", 0.9, 18.8, 19.8)], truth)[0] == [False, True]
    assert stream_eval.match([Event("no", 0.9, 18.7, 19.7)], truth)[0] == [False, False]


def test_measure_counts_false_accepts_per_keyword_and_per_hour_of_each_audio():
    from kws.stream_eval import Scored, Stream

    config = DetectionConfig(hop_frames=1, average_ms=20, min_count=1, suppression_ms=0)
    stream = Stream(np.zeros(36 * SAMPLE_RATE, np.float32), [])  # 0.01 h, no keyword said
    ends = np.array([1.0, 5.0])
    scored = Scored(ends, np.array([[0, 0, 1, 0], [0, 0, 1, 0]], float), stream.hours)
    speech = Scored(ends, np.array([[0, 0, 1, 0], [0, 0, 0, 1]], float), 0.5)
    result = stream_eval.measure(LABELS, stream, scored, speech, config)
    assert result["false_accepts"] == 2 and result["false_accepts_per_hour"] == 200.0
    assert {k: row["false_accepts"] for k, row in result["per_keyword"].items()} == {"yes": 2, "no": 0}
    assert result["real_speech"] == {
        "hours": 0.5,
        "false_accepts": 2,
        "false_accepts_per_hour": 4.0,  # over the speech's own hours
        "by_keyword": {"yes": 1, "no": 1},
    }


def test_det_points_weigh_each_keywords_recall_by_how_often_it_is_said():
    from kws.stream_eval import THRESHOLD_GRID, Stream

    truth = [("yes", 1.0, 2.0), ("yes", 3.0, 4.0), ("yes", 5.0, 6.0), ("no", 7.0, 8.0)]
    stream = Stream(np.zeros(36 * SAMPLE_RATE, np.float32), truth)
    table = {"yes": [(t, 1.0, 1, 0) for t in THRESHOLD_GRID], "no": [(t, 0.0, 0, 0) for t in THRESHOLD_GRID]}
    points = stream_eval.det_points(table, stream, None)
    assert len(points) == len(THRESHOLD_GRID)
    assert points[0] == {
        "threshold": float(THRESHOLD_GRID[0]),
        "recall": 0.75,
        "stream_fa_per_hour": 100.0,
        "speech_fa_per_hour": None,
    }


def test_the_sweep_fires_as_early_as_the_rules_at_the_start_of_a_stream():
    from kws.stream_eval import Scored

    scored = Scored(np.arange(1, 11) * 0.02, np.tile([0, 0, 1, 0], (10, 1)).astype(np.float32), 1.0)
    config = DetectionConfig(hop_frames=1, average_ms=60, min_count=3, suppression_ms=1000)
    fast = stream_eval.keyword_events(LABELS, scored, "yes", 0.5, config)
    rules_alone = DetectionConfig(**{**config.to_dict(), "thresholds": {"yes": 0.5, "no": 2.0}})
    assert [round(e.end, 2) for e in fast] == [0.06]
    assert fast == stream_eval.simulate(LABELS, scored, rules_alone)


def test_recording_report_is_the_detect_json(model, tone_export, tmp_path, capsys):
    audio, _ = tone_recording(["up"], gap_s=0.0)
    path = tmp_path / "up.wav"
    sf.write(path, audio[:CLIP_SAMPLES], SAMPLE_RATE)
    report = recording_report(Detector(model), [load(path)], str(path), top_k=2)
    assert report["duration"] == 1.0 and list(report["scores"])[0] == "up" and len(report["scores"]) == 2
    assert all(0 <= d["start"] <= d["end"] <= 1.0 for d in report["detections"])
    assert main(["detect", str(path), "--model", str(tone_export[0]), "--json", "--top-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == report
    (tmp_path / "noise.wav").write_bytes(b"RIFF not audio")
    assert main(["detect", str(tmp_path / "noise.wav"), "--model", str(tone_export[0]), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("kws detect: skipping ") and "noise.wav" in err


def test_threshold_replaces_every_keywords_or_only_the_keywords_it_names(tone_export, tmp_path, capsys):
    out, manifest = tone_export
    audio, _ = tone_recording(["yes", "no", "up"])
    path = tmp_path / "talk.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    calibrated = detection_config(manifest)
    some = detection_config(manifest, {"yes": 0.6})
    assert some == dataclasses.replace(calibrated, thresholds={**calibrated.thresholds, "yes": 0.6})
    assert detection_config(manifest, 0.6) == dataclasses.replace(
        calibrated, default_threshold=0.6, thresholds={}
    )
    model = Model.load(out)
    for given, config in (("yes=0.6", some), ("0.6", detection_config(manifest, 0.6))):
        assert main(["detect", str(path), "--model", str(out), "--threshold", given, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)["detections"]
        assert printed == [event.to_dict() for event in Detector(model, config).detect(audio)]
    assert main(["detect", str(path), "--model", str(out), "--threshold", "yes=0.6,nope=0.5"]) == 2
    assert capsys.readouterr().err == (
        "kws detect: error: --threshold: thresholds for nope, which are not keywords of this model "
        "(yes, no, up, down)\n"
    )


def test_the_readmes_python_example_prints_what_kws_detect_finds(tone_export, tmp_path, capsys):
    audio, _ = tone_recording(["yes", "no", "up"])
    path = tmp_path / "talk.flac"
    sf.write(path, np.stack([audio, audio], axis=1), 44_100)  # decoded, mixed and resampled by blocks
    example = readme_code("python", "Detector(model)")
    example = example.replace("Model.load()", f"Model.load({str(tone_export[0])!r})")
    exec(compile(example.replace('"talk.wav"', repr(str(path))), "README.md", "exec"), {})
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["detect", str(path), "--model", str(tone_export[0]), "--json"]) == 0
    assert printed == json.loads(capsys.readouterr().out)["detections"]
    assert len(printed) >= 1


def test_a_word_at_the_very_end_fires_in_the_tail_and_is_cut_to_the_recording(model):
    word = tone(WORD_TONES["up"], seed=1)
    # Its burst (the middle of the tone) ends the 1 s recording: the averages complete in the tail.
    recording = np.concatenate([np.zeros(CLIP_SAMPLES // 2, np.float32), word[: CLIP_SAMPLES // 2]])
    detector = Detector(model, DetectionConfig(default_threshold=0.5))
    cut = detector.detect(recording)
    detector.reset()
    assert detector.push(recording) == []
    ends, _, fired = detector.score_tail()
    assert [e.label for e in fired] == ["up"] and fired == cut  # fired in the tail,
    assert ends[-1] > 1.0 and cut[0].end == 1.0  # where model runs end after the recording
    report = recording_report(detector, [recording], "end")
    assert report["detections"] == [e.to_dict() for e in cut]
    assert report["detections"][0]["end"] == 1.0 and report["detections"][0]["start"] <= 1.0


def test_the_tail_finds_what_more_silence_after_the_recording_would(model):
    fired = 0
    # Words cut off at every point of their burst, at every kind of threshold.
    for word, kept in itertools.product(("up", "no"), range(4000, 16001, 1600)):
        said = tone(WORD_TONES[word], seed=1)[:kept]
        recording = np.concatenate([np.zeros(CLIP_SAMPLES // 2, np.float32), said])
        seconds = len(recording) / SAMPLE_RATE
        for threshold in (0.5, 0.7, 0.9, 0.99):
            detector = Detector(model, DetectionConfig(default_threshold=threshold))
            longer = detector.detect(np.concatenate([recording, np.zeros(2 * SAMPLE_RATE, np.float32)]))
            assert detector.detect(recording) == [event.clamped(seconds) for event in longer]
            fired += len(longer)
    assert fired >= 6


def test_detect_takes_folders_file_by_file_in_order(model, tone_export, tmp_path, capsys):
    up, _ = tone_recording(["up"], gap_s=0.0)
    down, _ = tone_recording(["down"], gap_s=0.0)
    folder = tmp_path / "recordings"
    (folder / "b").mkdir(parents=True)
    sf.write(folder / "b" / "down.flac", down[:CLIP_SAMPLES], SAMPLE_RATE)
    sf.write(folder / "up.wav", up[:CLIP_SAMPLES], SAMPLE_RATE)
    (folder / "notes.txt").write_text("not audio")
    (tmp_path / "elsewhere").mkdir()
    sf.write(tmp_path / "elsewhere" / "up.flac", up[:CLIP_SAMPLES], SAMPLE_RATE)
    (folder / "linked").symlink_to(tmp_path / "elsewhere")  # followed
    (folder / "b" / "loop").symlink_to(folder)  # followed once
    (folder / "alias").symlink_to(folder / "real")  # made first, so listed first here
    (folder / "real").mkdir()
    sf.write(folder / "real" / "down.wav", down[:CLIP_SAMPLES], SAMPLE_RATE)  # found under its own name
    again = folder / "b" / ".." / "up.wav"  # a file named twice is scored once
    assert main(["detect", str(folder), str(again), "--model", str(tone_export[0]), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    paths = [
        folder / "b" / "down.flac",
        folder / "linked" / "up.flac",
        folder / "real" / "down.wav",
        folder / "up.wav",
    ]
    assert reports == [recording_report(Detector(model), [load(path)], str(path)) for path in paths]
    assert [max(r["scores"], key=r["scores"].get) for r in reports] == ["down", "up", "down", "up"]
    (tmp_path / "empty").mkdir()
    assert main(["detect", str(tmp_path / "empty"), "--model", str(tone_export[0])]) == 1
    assert "a folder with no audio files" in capsys.readouterr().err


def test_a_recordings_report_holds_no_more_memory_for_an_hour_than_for_a_minute(model):
    import tracemalloc

    def peak(minutes: int) -> int:
        blocks = (np.zeros(10 * SAMPLE_RATE, np.float32) for _ in range(6 * minutes))  # 10 s at a time
        tracemalloc.start()
        recording_report(Detector(model), blocks, "long.wav")
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    # Every model run's scores, kept, would be 12.5 runs x 6 labels x 4 bytes a second: 1.1 MB an hour.
    assert peak(60) - peak(1) < 100_000


def test_detect_totals_several_recordings_per_hour_as_a_false_accept_meter(tone_export, tmp_path, capsys):
    words, _ = tone_recording(["yes", "no", "yes"])
    sf.write(tmp_path / "a.wav", words, SAMPLE_RATE)
    sf.write(tmp_path / "b.wav", np.zeros(60 * SAMPLE_RATE, np.float32), SAMPLE_RATE)  # nothing to find
    command = ["detect", str(tmp_path), "--model", str(tone_export[0]), "--threshold", "0.6"]
    assert main([*command, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    labels = [event["label"] for report in reports for event in report["detections"]]
    assert sorted(set(labels)) == ["no", "yes"] and reports[1]["detections"] == []
    seconds = len(words) / SAMPLE_RATE + 60
    assert main(command) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"2 recordings, {seconds / 60:.1f} min: {len(labels)} detections (yes {labels.count('yes')}, "
        f"no {labels.count('no')}, up 0, down 0), {len(labels) * 3600 / seconds:.1f} per hour"
    )
    # Under a minute of audio, a rate per hour would mean nothing.
    sf.write(tmp_path / "short.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    assert main([command[0], str(tmp_path / "a.wav"), str(tmp_path / "short.wav"), *command[2:]]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"2 recordings, {len(words) / SAMPLE_RATE + 1:.1f} s: {len(labels)} detections "
        f"(yes {labels.count('yes')}, no {labels.count('no')}, up 0, down 0)"
    )


def test_detect_finds_every_format_libsndfile_reads_in_a_folder(tone_export, tmp_path, capsys):
    up, _ = tone_recording(["up"], gap_s=0.0)
    names = ["a.w64", "b.rf64", "c.caf", "d.AIFF", "e.au"]
    for name in names:
        sf.write(tmp_path / name, up[:CLIP_SAMPLES], SAMPLE_RATE)
    assert main(["detect", str(tmp_path), "--model", str(tone_export[0]), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [Path(r["file"]).name for r in reports] == names
    assert all(max(r["scores"], key=r["scores"].get) == "up" for r in reports)


def test_detect_says_what_is_wrong_in_one_line_and_exits_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.zeros(CLIP_SAMPLES), SAMPLE_RATE)
    manifest = json.loads((BUILT_IN_MODEL / MANIFEST_FILE).read_text())
    int8 = (BUILT_IN_MODEL / manifest["files"]["int8"]).read_bytes()
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    other_frontend = {**manifest, "frontend": {**manifest["frontend"], "num_mfcc": 13}}
    broken = {
        "bad_json": ("{not json", int8),
        "no_files": ("{}", int8),
        "other_frontend": (json.dumps(other_frontend), int8),
        "not_a_model": (json.dumps(manifest), garbage),
    }
    for name, (text, tflite) in broken.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST_FILE).write_text(text)
        (tmp_path / name / manifest["files"]["int8"]).write_bytes(tflite)
    (tmp_path / "bare.tflite").write_bytes(garbage)
    cases = [
        (tmp_path / "run", "kws export"),
        (tmp_path / "model.onnx", "expected a .tflite"),
        (tmp_path / "bad_json", "is not valid JSON"),
        (tmp_path / "no_files", "files.int8"),
        (tmp_path / "other_frontend", "num_mfcc: 13 (this kws: 10)"),
        (tmp_path / "not_a_model", "not a model LiteRT can run"),
        (tmp_path / "bare.tflite", "is not a TFLite model"),
    ]
    for model_path, hint in cases:
        assert main(["detect", str(clip), "--model", str(model_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kws detect: error: ") and hint in err and err.count("\n") == 1


def test_a_report_is_the_same_however_the_recording_is_cut_and_the_bar_follows_it(model):
    audio, _ = tone_recording(["yes", "down", "no"])
    whole = recording_report(Detector(model), [audio], "long")
    assert len(whole["detections"]) >= 2

    class Bar:
        def __init__(self):
            self.updates = []

        def update(self, seconds):
            self.updates.append(seconds)

    bar = Bar()
    seconds = [audio[start : start + SAMPLE_RATE] for start in range(0, len(audio), SAMPLE_RATE)]
    assert recording_report(Detector(model), seconds, "long", progress=bar) == whole
    assert len(bar.updates) == len(seconds) and bar.updates[0] == 1.0
    assert sum(bar.updates) == pytest.approx(len(audio) / SAMPLE_RATE)
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(len(audio), 7, replace=False))
    assert recording_report(Detector(model), np.split(audio, cuts), "long") == whole


def test_long_recordings_list_detections_without_clip_scores(model):
    audio, truth = tone_recording(["yes", "down", "no"])
    report = recording_report(Detector(model, DetectionConfig(default_threshold=0.6)), [audio], "long")
    assert "scores" not in report
    events = [Event(d["label"], d["score"], d["start"], d["end"]) for d in report["detections"]]
    found, _ = stream_eval.match(events, truth)
    assert sum(found) >= 2


def test_a_rate_detector_hears_every_sample_of_a_stream_at_another_rate(model):
    from kws.stream import RateDetector

    audio, _ = tone_recording(["yes", "no"])
    at_44k = soxr.resample(audio, SAMPLE_RATE, 44_100)
    detector = Detector(model)
    live = RateDetector(detector, 44_100)
    events = [event for block in np.array_split(at_44k, 7) for event in live.push(block)] + live.flush()
    assert live.flush() == []  # as a Detector's: the stream has ended
    with pytest.raises(RuntimeError, match=r"ended by flush\(\): call reset\(\)"):
        live.push(at_44k)
    live.reset()
    assert live.push(at_44k) + live.flush() == events  # a new stream, from 0 s
    assert abs(detector.seconds - len(at_44k) / 44_100) <= 1 / SAMPLE_RATE  # the resampler drained
    assert [event.label for event in events] == [event.label for event in Detector(model).detect(audio)]
