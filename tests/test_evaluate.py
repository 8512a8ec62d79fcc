"""Classifier reports: accuracy, per class, by source, and other words one by one."""

import numpy as np

from kws.evaluate import format_report, report

LABELS = ["_silence_", "_unknown_", "yes", "no", "up"]


def test_other_words_are_counted_word_by_word_worst_rejected_first():
    # off: 1 of 3 rejected (2 taken for up); dog: 2 of 2; bed: 0 of 1 (taken for yes)
    words = np.array(["off", "off", "off", "dog", "dog", "bed", "yes", ""], dtype=object)
    sources = np.array(["other word"] * 6 + ["keyword", "negative speech"], dtype=object)
    targets = np.array([1, 1, 1, 1, 1, 1, 2, 1])
    predictions = np.array([4, 1, 4, 1, 1, 2, 2, 3])
    result = report(LABELS, targets, predictions, sources, words)
    assert result["accuracy"] == 4 / 8
    assert result["other_words"] == {
        "bed": {"examples": 1, "rejected": 0, "taken_for": {"yes": 1}},
        "off": {"examples": 3, "rejected": 1, "taken_for": {"up": 2}},
        "dog": {"examples": 2, "rejected": 2, "taken_for": {}},
    }
    text = format_report(result)
    lines = text.splitlines()
    first = lines.index(
        "other words (each should be _unknown_): clips rejected, and what the rest were taken for"
    )
    assert [line.split()[:2] for line in lines[first + 1 : first + 4]] == [
        ["bed", "0/1"],
        ["off", "1/3"],
        ["dog", "2/2"],
    ]
    assert lines[first + 2].endswith("up 2")


def test_without_words_the_report_has_no_other_words():
    result = report(
        LABELS, np.array([1, 2]), np.array([1, 2]), np.array(["other word", "keyword"], dtype=object)
    )
    assert "other_words" not in result
    assert "other words" not in format_report(result)
