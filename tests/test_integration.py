"""End to end on the real recordings in ../shared/data: train briefly, then evaluate the run."""

import json

import pytest

from kws.cli import main

pytestmark = pytest.mark.integration
WORDS = "yes,no,up,down,left,right,stop,go"


def test_train_two_epochs_on_the_shared_subset_then_eval(shared_data, tmp_path, capsys):
    short_run = tmp_path / "s8"
    data, negatives = shared_data / "speech_commands", shared_data / "librispeech"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--negatives",
                str(negatives),
                "--words",
                WORDS,
                "--epochs",
                "2",
                "--out",
                str(short_run),
            ]
        )
        == 0
    )
    metrics = json.loads((short_run / "metrics.json").read_text())
    validation = metrics["validation"]
    assert validation["examples"] > 2000
    assert (
        validation["per_class"]["_unknown_"]["support"]
        == validation["per_class"]["_silence_"]["support"]
        > 200
    )
    assert validation["accuracy"] > 0.6, "two epochs on real speech should already beat chance by far"

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(short_run),
                "--data",
                str(data),
                "--split",
                "validation",
                "--negatives",
                str(negatives),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(validation["accuracy"])
    assert result["confusion"]["labels"] == ["_silence_", "_unknown_", *WORDS.split(",")]
