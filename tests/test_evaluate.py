"""Classifier reports: accuracy, per class, by source, and other words one by one."""

import math
import re

import numpy as np
import pytest

from kws.evaluate import format_report, report

LABELS = ["_silence_", "_unknown_", "yes", "no", "up"]


def test_other_words_are_counted_word_by_word_worst_rejected_first():
    # off: 1 of 3 rejected (2 taken for up); cat: 3 of 4; dog: 2 of 2; bed: 0 of 1 (taken for yes).
    # Sorted by the share rejected, not the count (cat's 3 would come after dog's 2).
    words = np.array(["off"] * 3 + ["cat"] * 4 + ["dog", "dog", "bed", "yes", ""], dtype=object)
    sources = np.array(["other word"] * 10 + ["keyword", "negative speech"], dtype=object)
    targets = np.array([1] * 10 + [2, 1])
    predictions = np.array([4, 1, 4, 1, 1, 1, 3, 1, 1, 2, 2, 3])
    result = report(LABELS, targets, predictions, sources, words)
    assert result["accuracy"] == 7 / 12
    assert result["accuracy_by_source"] == {
        "keyword": {"accuracy": 1.0, "examples": 1},
        "negative speech": {"accuracy": 0.0, "examples": 1},
        "other word": {"accuracy": 0.6, "examples": 10},
    }
    assert list(result["other_words"].items()) == [
        ("bed", {"examples": 1, "rejected": 0, "taken_for": {"yes": 1}}),
        ("off", {"examples": 3, "rejected": 1, "taken_for": {"up": 2}}),
        ("cat", {"examples": 4, "rejected": 3, "taken_for": {"no": 1}}),
        ("dog", {"examples": 2, "rejected": 2, "taken_for": {}}),
    ]
    text = format_report(result)
    lines = text.splitlines()
    first = lines.index(
        "other words (each should be _unknown_): clips rejected, and what the rest were taken for"
    )
    assert [line.split()[:2] for line in lines[first + 1 : first + 5]] == [
        ["bed", "0/1"],
        ["off", "1/3"],
        ["cat", "3/4"],
        ["dog", "2/2"],
    ]
    assert lines[first + 2].endswith("up 2")


def test_without_words_the_report_has_no_other_words():
    result = report(
        LABELS, np.array([1, 2]), np.array([1, 2]), np.array(["other word", "keyword"], dtype=object)
    )
    assert "other_words" not in result
    assert "other words" not in format_report(result)


def test_the_text_report_shows_the_figures_of_the_json_one():
    # yes: 3 clips, 2 right, 1 taken for up; up: 1 clip, right; no: 2 clips, both taken for yes
    targets = np.array([2, 2, 2, 4, 3, 3])
    predictions = np.array([2, 2, 4, 4, 2, 2])
    result = report(LABELS, targets, predictions)
    assert result["per_class"]["yes"] == {"precision": 0.5, "recall": 2 / 3, "support": 3}
    # Undefined, not 0: "no" was never predicted, _silence_ neither predicted nor present.
    assert result["per_class"]["no"] == {"precision": None, "recall": 0.0, "support": 2}
    assert result["per_class"]["_silence_"] == {"precision": None, "recall": None, "support": 0}
    lines = format_report(result).splitlines()
    assert lines[0] == "accuracy 50.00% on 6 examples (95 % interval 18.8% to 81.2%)"
    assert lines[1:3] == ["", "class      precision  recall  support"]
    assert lines[5].split() == ["yes", "50.00%", "66.67%", "3"]
    assert lines[7].split() == ["up", "50.00%", "100.00%", "1"]
    assert lines[6].split() == ["no", "n/a", "0.00%", "2"]  # never predicted: no precision to give
    assert lines[3].split() == ["_silence_", "n/a", "n/a", "0"]  # never present, never predicted
    confusion = lines[lines.index("confusion (rows: true, columns: predicted)") + 1 :]
    assert confusion[0].split() == ["_silence_", "_unknown_", "yes", "no", "up"]  # whole, not cut
    # Each count ends where its label does, so a column reads straight down.
    ends = [[match.end() for match in re.finditer(r"\S+", line)] for line in confusion]
    assert all(row[1:] == ends[0] for row in ends[1:])
    assert confusion[3].split() == ["yes", "0", "0", "2", "0", "1"]  # rows are the true class
    assert confusion[4].split() == ["no", "0", "0", "2", "0", "0"]


@pytest.mark.parametrize(("correct", "examples"), [(9, 10), (10, 10), (0, 5), (2299, 2440)])
def test_the_accuracy_comes_with_wilsons_95_percent_interval(correct, examples):
    # Wilson's score interval, written out: it stays inside [0, 1] where "p +- 2 standard
    # errors" would pass 100 % for 10 of 10.
    z, p = 1.959964, correct / examples
    centre = (p + z**2 / (2 * examples)) / (1 + z**2 / examples)
    half = z / (1 + z**2 / examples) * math.sqrt(p * (1 - p) / examples + z**2 / (4 * examples**2))
    targets = np.zeros(examples, int)
    predictions = np.where(np.arange(examples) < correct, 0, 1)
    low, high = report(LABELS, targets, predictions)["accuracy_interval"]
    assert low == pytest.approx(centre - half, abs=1e-5) and high == pytest.approx(centre + half, abs=1e-5)
    assert 0 <= low <= p <= high <= 1
