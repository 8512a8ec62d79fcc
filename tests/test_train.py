"""Training runs on synthetic data: run folder contents, config round trip, resume, eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import TONE_WORDS as WORDS
from conftest import WORD_TONES, make_dataset, tone
from conftest import tone_run_config as run_config

from kws.cli import main
from kws.data import SPLITS, DataError
from kws.features import NUM_FRAMES, NUM_MFCC
from kws.runtime import ModelError
from kws.train import RunConfig, TrainConfig, _resumed, latest_checkpoint, train


def test_run_folder_holds_model_config_metrics_and_plots(tone_run):
    run, metrics = tone_run
    for name in (
        "config.json",
        "model.keras",
        "metrics.json",
        "training_curves.png",
        "confusion_validation.png",
    ):
        assert (run / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch-0005.json",
        "epoch-0005.keras",
        "epoch-0006.json",
        "epoch-0006.keras",
    ]
    assert not list(run.glob(".tmp-*"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["parameters"] == metrics["parameters"] > 20_000 and saved["macs"] > 2_000_000
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["learning_rate"] for h in saved["history"]] == [3e-3, 3e-3, 1e-3, 1e-3, 3e-4, 3e-4]


def test_tones_are_learned(tone_run):
    _, metrics = tone_run
    assert metrics["validation"]["accuracy"] > 0.8
    assert metrics["validation"]["per_class"]["_silence_"]["support"] > 0


def test_config_json_round_trips_and_records_the_data(tone_run):
    run, _ = tone_run
    config = RunConfig.load(run)
    assert json.loads(json.dumps(config.to_dict())) == json.loads((run / "config.json").read_text())
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.labels == ["_silence_", "_unknown_", *WORDS]
    assert config.data_summary["clips_per_split"]["training"]["yes"] > 10
    assert config.frontend["num_frames"] == 49


def test_eval_of_the_validation_split_reproduces_training_metrics(tone_run, tone_dataset, capsys):
    run, metrics = tone_run
    assert main(["eval", "--model", str(run), "--data", str(tone_dataset), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])
    assert result["confusion"] == metrics["validation"]["confusion"]
    assert set(result["per_class"]["yes"]) == {"precision", "recall", "support"}


def test_eval_warns_when_the_data_splits_the_models_training_clips_otherwise(
    tone_run, tone_dataset, tmp_path, capsys
):
    from kws.data import scan

    run, _ = tone_run
    assert main(["eval", "--model", str(run), "--data", str(tone_dataset)]) == 0
    assert "warning" not in capsys.readouterr().err  # the data it trained with, split as it was
    data = tmp_path / "data"
    shutil.copytree(tone_dataset, data)
    listed = (data / "validation_list.txt").read_text().splitlines()
    # Fewer validation clips: a part of those it never trained on, which is no leak.
    (data / "validation_list.txt").write_text(
        "\n".join(line for line in listed if not line.startswith("yes/"))
    )
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 0
    assert "warning" not in capsys.readouterr().err
    trained = [f"yes/{c.path.name}" for c in scan(tone_dataset) if c.word == "yes" and c.split == "training"]
    moved = trained[:2]  # two clips it trained on, now listed
    (data / "validation_list.txt").write_text("\n".join(listed + moved))
    warning = (
        f"warning: {data} holds the clips of each keyword the model trained with, but fewer of them in "
        "training than when it trained (yes -2) and more in validation: clips it trained on are scored, "
        "so its figures read high"
    )
    assert main(["eval", "--model", str(run), "--data", str(data), "--split", "validation"]) == 0
    assert capsys.readouterr().err.startswith(warning)
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 0  # test: none of them scored
    assert "warning" not in capsys.readouterr().err
    # In test, which eval scores by default; and beside a clip training could not read.
    (data / "validation_list.txt").write_text("\n".join(listed))
    (data / "testing_list.txt").write_text((data / "testing_list.txt").read_text() + "\n".join(moved))
    (data / "yes" / "broken.wav").write_bytes(b"not audio")  # hashed into training: one fewer counted out
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 0
    assert "than when it trained (yes -1) and more in testing: clips it trained on" in capsys.readouterr().err


def test_eval_threshold_is_refused_without_stream(tone_run, tone_dataset, capsys):
    args = ["eval", "--model", str(tone_run[0]), "--data", str(tone_dataset), "--threshold", "0.9"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "kws eval: error: --threshold is for --stream: clip accuracy takes each clip's best class\n"
    )


def test_eval_stream_measures_the_exports_stream_and_refuses_a_split(tone_export, tone_dataset, capsys):
    out, manifest = tone_export
    args = ["eval", "--stream", "--model", str(out), "--data", str(tone_dataset)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = manifest["streaming"]  # measured by the export at the same thresholds, on the same data
    assert result["split"] == "validation" and result["keywords"] == recorded["keywords"] > 0
    assert (result["recall"], result["false_accepts"]) == (recorded["recall"], recorded["false_accepts"])
    assert main([*args, "--split", "test"]) == 2
    assert capsys.readouterr().err == (
        "kws eval: error: --split is for clip accuracy: "
        "the test stream is always built from validation clips\n"
    )


def test_data_without_the_models_keywords_is_measured_as_a_stream_but_not_scored_or_calibrated_on(
    tone_export, tmp_path, capsys, monkeypatch
):
    out, _ = tone_export
    others = make_dataset(tmp_path / "others", words=("bed", "cat"))  # none of the model's keywords
    plot = tmp_path / "det.png"
    args = ["eval", "--stream", "--model", str(out), "--data", str(others)]
    assert main([*args, "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert "test stream" in captured.out and "0 keywords: recall n/a" in captured.out
    assert "a DET curve needs keywords in the test stream" in captured.err and not plot.exists()
    assert main(["eval", "--model", str(out), "--data", str(others), "--split", "validation"]) == 2
    assert "holds none of the model's keywords (yes, no, up, down)" in capsys.readouterr().err
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    monkeypatch.setattr("kws.stream_eval.score", None)  # refused before any scoring
    assert main(["calibrate", str(copy), "--data", str(others)]) == 2
    assert "holds none of the model's keywords" in capsys.readouterr().err
    assert (copy / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_eval_text_and_plot(tone_run, tone_dataset, tmp_path, capsys):
    run, _ = tone_run
    plot = tmp_path / "plots" / "confusion.png"  # a folder that does not exist yet
    args = ["eval", "--model", str(run), "--data", str(tone_dataset), "--split", "test"]
    assert main([*args, "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("accuracy ") and "confusion (rows: true" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_stream_draws_the_det_curve(tone_export, tone_dataset, tmp_path, capsys):
    plot = tmp_path / "plots" / "det.png"  # a folder that does not exist yet
    args = ["eval", "--stream", "--model", str(tone_export[0]), "--data", str(tone_dataset)]
    assert main([*args, "--plot", str(plot)]) == 0
    assert "test stream" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_of_equally_accurate_epochs_the_one_with_the_lowest_validation_loss_is_kept(tmp_path):
    from kws.runtime import MODEL_FILE
    from kws.train import _keep_if_best

    class Model:  # saves which epoch it was, in place of weights
        def save(self, path):
            Path(path).write_text(str(self.epoch))

    model = Model()
    state = {"best_accuracy": -1.0, "best_val_loss": np.inf, "best_epoch": 0}
    # A small validation set reaches 100 % early, then the loss goes on falling, then rises.
    for model.epoch, accuracy, loss in [
        (1, 0.9, 0.5),
        (2, 1.0, 0.3),
        (3, 1.0, 0.2),
        (4, 1.0, 0.25),
        (5, 0.95, 0.1),
    ]:
        _keep_if_best(
            tmp_path, model, state, {"epoch": model.epoch, "val_accuracy": accuracy, "val_loss": loss}
        )
    assert state == {"best_accuracy": 1.0, "best_val_loss": 0.2, "best_epoch": 3}
    assert (tmp_path / MODEL_FILE).read_text() == "3"


def test_data_without_validation_clips_of_keywords_is_refused_before_the_run_folder(tiny_dataset, tmp_path):
    listed = (tiny_dataset / "validation_list.txt").read_text().splitlines()
    for kept in ([], [line for line in listed if line.startswith("bed/")]):  # none, or other words only
        (tiny_dataset / "validation_list.txt").write_text("\n".join(kept))
        config = run_config(tiny_dataset, epochs=1)
        config.data.validation_percent = 0
        with pytest.raises(DataError, match="no validation clips of any keyword in .*validation_list.txt"):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # so the same command can run again once the data is fixed


def test_training_warns_of_a_keyword_it_cannot_test_and_of_missing_noise(tiny_dataset, tmp_path, capsys):
    from kws.data import SpeechData
    from kws.train import _checked_validation

    lines = (tiny_dataset / "validation_list.txt").read_text().splitlines()
    (tiny_dataset / "validation_list.txt").write_text("\n".join(line for line in lines if "down" not in line))
    shutil.rmtree(tiny_dataset / "_background_noise_")
    config = run_config(tiny_dataset, epochs=1)
    config.data.validation_percent = 0
    train(config, tmp_path / "run")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 5
    assert warnings[4].startswith("warning: 1 epoch of ") and "train with --epochs " in warnings[4]
    # Under 20 training clips of each keyword, as in all these tests: too few, whatever the others have.
    assert warnings[0].startswith(
        "warning: few training clips of 'yes' (8), 'no' (9), 'up' (7), 'down' (11): a model learns a word "
        "from hundreds of clips in many voices (Speech Commands has thousands of each), and from under 20"
    )
    # Two validation clips each, as everywhere in these tests: the best epoch rests on a few.
    assert warnings[1].startswith("warning: few validation clips of 'yes' (2), 'no' (2), 'up' (2): one clip")
    assert "no validation clips of 'down'" in warnings[2] and "no background noise" in warnings[3]
    assert "is not that folder" not in warnings[3]
    (tiny_dataset / "_background_noise_").mkdir()  # there, but empty: no other folder to blame
    _, found = _checked_validation(SpeechData(config.data), config.train)
    capsys.readouterr()
    assert any(w.startswith("no background noise") and "is not that folder" not in w for w in found)
    (tiny_dataset / "_background_noise_").rmdir()
    # Noise in a folder of another name, read as other words or, starting with _, skipped.
    for misnamed in ("noise", "_background_noise"):
        (tiny_dataset / misnamed).mkdir()
        sf.write(tiny_dataset / misnamed / "fan.wav", np.zeros(16000, np.float32), 16000)
        _, found = _checked_validation(SpeechData(config.data), config.train)
        capsys.readouterr()
        assert any(
            f"; {misnamed}/ is not that folder (a folder starting with _ is skipped" in w for w in found
        )
        shutil.rmtree(tiny_dataset / misnamed)
    for other in ("bed", "cat"):  # nothing left to learn _unknown_ from
        shutil.rmtree(tiny_dataset / other)
    train(config, tmp_path / "run2")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings[-2].startswith(
        "warning: no other words and no --negatives: the model learns no _unknown_"
    )


def test_clips_that_cannot_be_read_are_counted_in_the_runs_warnings(tiny_dataset, capsys):
    from kws.data import SpeechData, scan
    from kws.train import _checked_validation

    config = run_config(tiny_dataset, epochs=1)
    training = [clip.path for clip in scan(tiny_dataset) if clip.split == "training" and clip.word == "yes"]
    training[0].write_bytes(b"not audio")
    _, warnings = _checked_validation(SpeechData(config.data), config.train)
    unread = "clips left out as unreadable: 1 of the training clips, 0 of the validation clips"
    assert unread in warnings
    assert f"skipping {training[0]}" in capsys.readouterr().err


def test_one_voice_is_told_how_to_validate_and_then_warned_of_once(tmp_path):
    from kws.data import DataError, SpeechData
    from kws.train import _checked_validation

    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no"))
    for word in ("yes", "no"):  # only alice's takes, in her folder: the hash puts her in training
        for path in (data / word).iterdir():
            path.unlink()
        (data / word / "alice").mkdir()
        for take in range(6):
            sf.write(data / word / "alice" / f"take{take}.wav", tone(WORD_TONES[word], seed=take), 16000)
    (data / "testing_list.txt").write_text("")
    (data / "validation_list.txt").write_text("")
    config = run_config(data, epochs=1)
    config.data.words = ["yes", "no"]
    with pytest.raises(
        DataError, match=r"record more speakers; or, to train on one voice, .* \(it found 1: alice\)$"
    ):
        _checked_validation(SpeechData(config.data), config.train)
    (data / "validation_list.txt").write_text("yes/alice/take0.wav\nno/alice/take0.wav\n")
    _, warnings = _checked_validation(SpeechData(config.data), config.train)
    assert f"every keyword clip of {data} is one speaker's (alice): validation hears the voice" in " ".join(
        warnings
    )
    assert not any("clips in validation and in training" in warning for warning in warnings)


def test_training_warns_of_too_few_steps_to_learn():
    from kws.train import _few_steps

    # Own recordings of three words: one batch an epoch, where 40 epochs left a model at 30 %.
    assert _few_steps(TrainConfig(epochs=40), 26) == (
        "40 epochs of 26 examples make only 40 training steps (batches of 100), too few for the model "
        "to learn: it may end up labelling everything as one class; train with --epochs 200 or more"
    )
    assert "--epochs 100 or more" in _few_steps(TrainConfig(epochs=40), 101)  # two batches an epoch
    assert _few_steps(TrainConfig(epochs=40), 401) is None  # 5 batches: 200 steps
    assert _few_steps(TrainConfig(epochs=100), 14307) is None  # the built-in model's recipe


def test_training_warns_of_file_names_that_give_no_speaker(tmp_path, capsys):
    from kws.data import SpeechData
    from kws.train import _checked_validation

    dataset = make_dataset(tmp_path / "speech_commands", speakers_per_word=12)
    config = run_config(dataset, epochs=1)
    _checked_validation(SpeechData(config.data), config.train)
    assert "say their speaker" not in capsys.readouterr().err  # Speech Commands' names and lists
    (dataset / "validation_list.txt").unlink()
    (dataset / "testing_list.txt").unlink()
    for word in WORD_TONES:  # keywords and other words
        for number, clip in enumerate(sorted((dataset / word).iterdir())):
            clip.rename(clip.with_name(f"take{number}.wav"))  # own recordings, one person's takes
    _, warnings = _checked_validation(SpeechData(config.data), config.train)
    assert (
        f"of {dataset} do not say their speaker (SPEAKER_nohash_N.wav), so each clip is split as a "
        "speaker of its own"
    ) in capsys.readouterr().err
    assert any(warning.startswith("the file names in ") for warning in warnings)  # for the run's record
    # A list naming some clips: the others are still split by the hash, and still leak.
    (dataset / "validation_list.txt").write_text("yes/take0.wav\n")
    _checked_validation(SpeechData(config.data), config.train)
    assert "so each clip that validation_list.txt does not name is split" in capsys.readouterr().err
    # A list naming every clip the hash would put in validation: validation is the list's alone.
    hashed = [c for c in SpeechData(config.data).clips if c.split == "validation"]
    (dataset / "validation_list.txt").write_text("".join(f"{c.word}/{c.path.name}\n" for c in hashed))
    _checked_validation(SpeechData(config.data), config.train)
    assert "say their speaker" not in capsys.readouterr().err


def test_own_takes_beside_speech_commands_folders_are_warned_of(tmp_path, capsys):
    from kws.data import SpeechData
    from kws.train import _checked_validation

    dataset = make_dataset(tmp_path / "speech_commands", speakers_per_word=12)
    config = run_config(dataset, epochs=1)
    (dataset / "house").mkdir()  # one's own word beside the others, as the README says to add it
    for number in range(40):
        sf.write(dataset / "house" / f"take{number}.wav", tone(300.0), 16000)
    _, warnings = _checked_validation(SpeechData(config.data), config.train)
    capsys.readouterr()
    assert any(
        w.startswith(f"the file names in house/ of {dataset} do not say their speaker") for w in warnings
    )


@pytest.mark.parametrize(
    ("split", "speaker", "word", "measure"),
    [("validation", "00yesab", "yes", "validation"), ("testing", "02upab", "up", "test")],
)
def test_training_warns_of_speakers_the_lists_put_on_both_sides(
    tmp_path, capsys, split, speaker, word, measure
):
    from kws.data import SpeechData, speaker_id, which_set
    from kws.train import _checked_validation

    dataset = make_dataset(tmp_path / "speech_commands", speakers_per_word=12)
    config = run_config(dataset, epochs=1)
    _checked_validation(SpeechData(config.data), config.train)
    assert "and in training" not in capsys.readouterr().err  # the lists go by speaker
    # A listed speaker's "no", which the list leaves out and the speaker hash puts in training.
    extra_take = dataset / "no" / f"{speaker}_nohash_1.wav"
    hashed_to = which_set(speaker_id(extra_take), config.data.validation_percent, config.data.testing_percent)
    assert hashed_to == "training"
    shutil.copy(dataset / word / f"{speaker}_nohash_0.wav", extra_take)
    _checked_validation(SpeechData(config.data), config.train)
    assert (
        f"warning: 1 speaker of {dataset} has clips in {split} and in training (as {speaker}: "
        f"{word}/{speaker}_nohash_0.wav in {split}, no/{speaker}_nohash_1.wav in training), as "
        f"{split}_list.txt names only some of their clips: the model hears their voices in training, so "
        f"{measure} accuracy reads a little high"
    ) in capsys.readouterr().err


def test_training_warns_of_a_keyword_with_few_clips(tmp_path, capsys):
    from kws.data import scan

    dataset = make_dataset(tmp_path / "speech_commands", speakers_per_word=40)
    config = run_config(dataset, epochs=1)
    training = {
        word: [c.path for c in scan(dataset) if c.word == word and c.split == "training"]
        for word in config.data.words
    }
    for path in training["up"][1:]:  # one training clip of "up" left, as "off" has 5 in the shared subset
        path.unlink()
    typical = np.median([len(paths) if word != "up" else 1 for word, paths in training.items()])
    train(config, tmp_path / "run")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: few t")]
    assert typical > 20 and warnings == [
        f"warning: few training clips of 'up' (1) against {typical:g} for a typical keyword: the model "
        "will seldom hear them and may never spot them; add clips of them, or leave them out of --words"
    ]


def test_resume_continues_after_the_last_complete_checkpoint(tone_dataset, tmp_path):
    run = tmp_path / "run"
    first = train(run_config(tone_dataset, epochs=2), run)
    # A checkpoint whose state file never got written (killed mid-save) is ignored.
    (run / "checkpoints" / "epoch-0003.keras").write_bytes(b"half")
    # A checkpoint of an older kws, which kept no best validation loss.
    state_file = run / "checkpoints" / "epoch-0002.json"
    state = json.loads(state_file.read_text())
    del state["best_val_loss"]
    state_file.write_text(json.dumps(state))
    _, backfilled = _resumed(*latest_checkpoint(run))
    assert backfilled["best_val_loss"] == first["history"][first["best_epoch"] - 1]["val_loss"]
    config = RunConfig.load(run)
    config.train.epochs = 3
    resumed = train(config, run, resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]
    best = max(resumed["history"], key=lambda epoch: (epoch["val_accuracy"], -epoch["val_loss"]))
    assert resumed["best_epoch"] == best["epoch"]


def test_resuming_on_data_split_otherwise_is_warned_of(tone_dataset, tmp_path, capsys):
    from kws.data import scan

    data = tmp_path / "data"
    shutil.copytree(tone_dataset, data)
    run = tmp_path / "run"
    train(run_config(data, epochs=1), run)
    capsys.readouterr()
    config = RunConfig.load(run)
    config.train.epochs = 2
    trained = next(c for c in scan(data) if c.word == "yes" and c.split == "training")
    with open(data / "validation_list.txt", "a") as lines:
        lines.write(f"\nyes/{trained.path.name}\n")
    before = config.data_summary["clips_per_split"]
    placed = "/".join(str(before[split]["yes"]) for split in ("training", "validation", "testing"))
    train(config, run, resume=True)
    t, v, s = (int(n) for n in placed.split("/"))
    assert (
        f"warning: the data splits otherwise than when {run} started (training/validation/test: "
        f"yes {placed} -> {t - 1}/{v + 1}/{s}): the model goes on with other clips"
    ) in capsys.readouterr().err


def test_a_resumed_run_trains_as_the_uninterrupted_one(tone_dataset, tmp_path):
    whole = train(run_config(tone_dataset, epochs=3), tmp_path / "whole")
    # The same run killed after its second epoch: its third checkpoint never got written.
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    for part in (tmp_path / "killed" / "checkpoints").glob("epoch-0003.*"):
        part.unlink()
    resumed = train(RunConfig.load(tmp_path / "killed"), tmp_path / "killed", resume=True)

    def figures(metrics):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]

    assert figures(resumed) == figures(whole)


def test_resume_through_the_cli_and_refusing_to_overwrite(tone_dataset, tmp_path, capsys, monkeypatch):
    run = tmp_path / "cli-run"
    base = ["train", "--data", str(tone_dataset), "--words", ",".join(WORDS), "--out", str(run)]
    assert main([*base, "--epochs", "1"]) == 0
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    unknown, silence = (validation["per_class"][label] for label in ("_unknown_", "_silence_"))
    printed = capsys.readouterr()
    assert (
        f"validation accuracy {validation['accuracy']:.2%} of {validation['examples']} examples "
        f"(_unknown_ recall {unknown['recall']:.2%} of {unknown['support']}, _silence_ recall "
        f"{silence['recall']:.2%} of {silence['support']});"
    ) in printed.out
    clips = json.loads((run / "config.json").read_text())["data_summary"]["clips_per_split"]
    placed = {word: "/".join(str(clips[split][word]) for split in SPLITS) for word in (WORDS[0], "_unknown_")}
    assert f"clips found in training/validation/test: {WORDS[0]} {placed[WORDS[0]]}, " in printed.err
    assert f", other words {placed['_unknown_']}\n" in printed.err and placed["_unknown_"] != "0/0/0"
    assert main([*base, "--epochs", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    # A setting the resumed run would not use is refused, not silently dropped.
    assert main(["train", "--resume", str(run), "--epochs", "2", "--seed", "3", "--size", "m"]) == 2
    assert capsys.readouterr().err.startswith(
        "kws train: error: --size, --seed cannot change a run being resumed: it goes on with the settings"
    )
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 2
    printed = capsys.readouterr().out
    # Resuming a finished run reads no data again: it says so and repeats its result.
    monkeypatch.setattr("kws.train.SpeechData", None)
    assert main(["train", "--resume", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.err.endswith(
        f"{run} has trained all its 2 epochs already; --epochs N (over 2) trains it further\n"
    )
    assert captured.out == printed.splitlines(keepends=True)[-1]  # the result line, as it was
    # Metrics older than the last checkpoint (stopped before they were rewritten): computed again.
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "history": metrics["history"][:1]}))
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert "trained all its" not in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["history"] == metrics["history"]
    # Fewer epochs than it has trained would leave config.json saying what the model is not.
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert capsys.readouterr().err.endswith(
        "has trained 2 epochs already: resume it with --epochs 2 or more\n"
    )
    assert RunConfig.load(run).train.epochs == 2
    # Its data moved: where to say so, as --data is not taken here.
    moved = run.with_name("moved-run")
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["data_dir"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(moved), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gone'} is not there: the run reads its folders from {moved / 'config.json'}" in err
    assert "--data" not in err


def test_data_read_as_a_test_package_or_given_as_negatives_is_refused_for_training(
    tone_dataset, tmp_path, capsys
):
    run = tmp_path / "r"
    data = tmp_path / "data"
    shutil.copytree(tone_dataset, data)
    assert main(["train", "--data", str(data), "--negatives", str(data), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"--negatives {data} holds yes, no, up, down, _background_noise_: it looks like the" in err
    (data / "_unknown_").mkdir()  # as a user might gather their other words
    assert main(["train", "--data", str(data), "--words", ",".join(WORDS), "--out", str(run)]) == 2
    assert "has a _silence_ or _unknown_ folder, so it reads as the official test set package" in (
        capsys.readouterr().err
    )
    assert not run.exists()


def test_a_run_records_absolute_paths_and_evaluates_without_its_extra_clips(
    tone_dataset, tmp_path, monkeypatch, capsys
):
    extra = tmp_path / "extra"
    shutil.copytree(tone_dataset / WORDS[0], extra / WORDS[0])
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(tone_dataset)
    args = ["train", "--data", data, "--words", ",".join(WORDS), "--extra", "extra", "--out", "run"]
    assert main([*args, "--epochs", "1"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    recorded = config["data"]
    assert recorded["data_dir"] == str(tone_dataset.resolve())
    assert recorded["extra"] == [str(extra.resolve())]
    # Given relative, counted all the same: the model card says how many clips are theirs.
    given = len(list((extra / WORDS[0]).iterdir()))
    assert config["data_summary"]["extra_clips"] == {str(extra.resolve()): {WORDS[0]: given}}
    # The extra clips only trained: evaluating needs neither them nor the folder training ran in.
    shutil.rmtree(extra)
    monkeypatch.chdir(tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", "--model", ".", "--data", str(tone_dataset), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"]["yes"]["support"] > 0


def test_python_m_kws_shows_help_with_the_configs_defaults():
    from kws.data import DEFAULT_WORDS, DataConfig

    out = subprocess.run(
        [sys.executable, "-m", "kws", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--negatives DIR" in out.stdout and "--resume RUN" in out.stdout
    # The help states the defaults the configs hold: left out, an option keeps its config's value.
    text = " ".join(out.stdout.split())
    data, train_config = DataConfig("x"), TrainConfig()
    assert f"(default: {','.join(DEFAULT_WORDS)})" in text
    assert f"passes over the data (default {train_config.epochs})" in text
    assert f"random seed (default {train_config.seed})" in text
    assert f"share of _silence_ examples (default {data.silence_share:g})" in text
    assert f"share of _unknown_ examples (default {data.unknown_share:g}," in text


def test_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no audio clips found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # no half-made run folder to trip over
    sf.write(tmp_path / "empty" / "a_nohash_0.wav", np.zeros(1600, np.float32), 16000)  # one word's clips
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (
        f"kws train: error: {tmp_path / 'empty'} holds audio files but no folder of them: it reads as one "
        f"word's clips; pass the folder that holds one such folder per word ({tmp_path})\n"
    )
    (tmp_path / "lists" / "yes").mkdir(parents=True)
    sf.write(tmp_path / "lists" / "yes" / "a_nohash_0.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "lists" / "validation_list.txt").mkdir()
    assert (
        main(["train", "--data", str(tmp_path / "lists"), "--words", "yes", "--out", str(tmp_path / "r")])
        == 2
    )
    assert capsys.readouterr().err == (
        f"kws train: error: {tmp_path / 'lists' / 'validation_list.txt'} is a folder: a split list is a "
        "text file, one WORD/FILE a line\n"
    )


def test_a_misspelled_keyword_or_a_bad_seed_is_refused_before_the_run_folder(tone_dataset, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--data", str(tone_dataset), "--words", "yes,nope", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"no folder 'nope' in {tone_dataset}: check the spelling in --words" in err
    # Without --words, the default keywords were asked for: the user spelled none of them.
    assert main(["train", "--data", str(tone_dataset), "--out", str(run)]) == 2
    assert f"no folder 'left' in {tone_dataset}: the default keywords (yes,no,up,down,left," in (
        capsys.readouterr().err
    )
    assert not run.exists()  # so the same --out works once the word is fixed
    data = tmp_path / "data"
    shutil.copytree(tone_dataset, data)
    (data / "radio").mkdir()  # made, but not filled yet
    (data / "fm" / "session1").mkdir(parents=True)  # a keyword's clips in a subfolder are read
    shutil.copytree(data / "up", data / "fm" / "session1", dirs_exist_ok=True)
    (data / "fm" / "session1" / "take 1.m4a").write_bytes(b"")  # not read, and said so
    assert main(["train", "--data", str(data), "--words", "yes,radio,fm", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"no training clips of 'radio' in {data}: {data / 'radio'} holds no audio files kws reads (" in err
    assert "'fm'" not in err.split("error:")[1]
    assert f"warning: left out, not being audio kws reads: files in the word folders of {data} " in err
    assert f"(.m4a 1; the first: {data / 'fm' / 'session1' / 'take 1.m4a'}); recordings among them: " in err
    (data / "Radio").mkdir()
    (data / "gone").symlink_to(tmp_path / "nowhere")
    assert main(["train", "--data", str(data), "--words", "yes,gone", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'gone'} links to {tmp_path / 'nowhere'}, which does not exist" in err
    assert main(["train", "--data", str(data), "--words", "yes,radio", "--out", str(run)]) == 2
    assert (
        f"{data / 'Radio'} is not the keyword 'radio': folder names are case-sensitive"
        in capsys.readouterr().err
    )
    shutil.rmtree(data / "Radio")
    shutil.rmtree(data / "radio")
    run.write_text("")
    assert main(["train", "--data", str(data), "--out", str(run)]) == 2
    assert f"--out {run} is a file: a run is a folder" in capsys.readouterr().err
    run.unlink()
    (data / "hey").mkdir()
    take = next((data / "up").iterdir())
    for n in range(4):  # one speaker, whom the speaker hash puts in test
        shutil.copy(take, data / "hey" / f"speaker7_nohash_{n}{take.suffix}")
    assert main(["train", "--data", str(data), "--words", "yes,hey", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    counts = next(
        line for line in err.splitlines() if line.startswith("clips found in training/validation/test")
    )
    assert ", hey 0/0/4, other words " in counts and err.index(counts) < err.index("error:")  # before it
    assert (
        f"no training clips of 'hey' in {data}: every clip in {data / 'hey'} is in validation (0) or test "
        "(4): the clips no split list names are all one speaker's (speaker7). As the speaker hash puts "
        "each speaker's clips (named before _nohash_, else by their subfolder) in one split: record more "
        "speakers; or, to train on one voice, name its files without _nohash_"
    ) in err
    (data / "ho").mkdir()  # a second such word: the advice comes once
    for n in range(4):
        shutil.copy(take, data / "ho" / f"speaker7_nohash_{n}{take.suffix}")
    assert main(["train", "--data", str(data), "--words", "yes,hey,ho", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no training clips of 'hey', 'ho' in " in err and err.count("record more speakers") == 1
    shutil.rmtree(data / "ho")
    shutil.rmtree(data / "hey")
    for clip in (data / "up").iterdir():  # every clip of "up" broken: 0 examples to learn it from
        clip.write_text("not audio")
    assert main(["train", "--data", str(data), "--words", "yes,up", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"no training clips of 'up' in {data}: none of the " in err and "could be read" in err
    assert not run.exists()
    for command in (["train", "--data", str(tone_dataset)], ["synth", "--words", "yes"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--seed", "-1", "--out", str(run)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "--seed: must be a whole number from 0 to" in err


def test_ema_ends_each_epoch_on_the_averaged_weights(tone_dataset, tmp_path):
    import keras
    import numpy as np

    with pytest.raises(ValueError, match="ema_momentum"):
        TrainConfig(ema_momentum=1.0)
    plain, averaged = run_config(tone_dataset, epochs=1), run_config(tone_dataset, epochs=1)
    averaged.train.ema_momentum = 0.9
    train(plain, tmp_path / "plain")
    train(averaged, tmp_path / "ema")
    ema_model = keras.models.load_model(tmp_path / "ema" / "checkpoints" / "epoch-0001.keras")
    plain_model = keras.models.load_model(tmp_path / "plain" / "checkpoints" / "epoch-0001.keras")
    averages = ema_model.optimizer._model_variables_moving_average
    for weight, average in zip(ema_model.trainable_variables, averages, strict=True):
        np.testing.assert_array_equal(weight.numpy(), average.numpy())
    changed = [
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(ema_model.trainable_variables, plain_model.trainable_variables, strict=True)
    ]
    assert all(changed)  # same seed and data: only the averaging tells them apart


def _teacher_that_always_says(label: int, like_run, folder):
    """A run folder whose model gives every input the same probabilities, peaked on ``label``."""
    import shutil

    import keras
    import numpy as np

    shutil.copytree(like_run, folder)
    labels = RunConfig.load(like_run).labels
    inputs = (NUM_FRAMES, NUM_MFCC)
    model = keras.Sequential(
        [keras.Input(inputs), keras.layers.Flatten(), keras.layers.Dense(len(labels), activation="softmax")]
    )
    bias = np.full(len(labels), -5.0, dtype=np.float32)
    bias[label] = 5.0
    model.layers[-1].set_weights([np.zeros((NUM_FRAMES * NUM_MFCC, len(labels)), dtype=np.float32), bias])
    model.save(folder / "model.keras")
    return folder


def test_a_student_learns_the_teachers_answers_not_the_labels(tone_run, tone_dataset, tmp_path):
    run, _ = tone_run
    silence = RunConfig.load(run).labels.index("_silence_")
    config = run_config(tone_dataset, epochs=2)
    config.train.teachers = (str(_teacher_that_always_says(silence, run, tmp_path / "teacher")),)
    config.train.teacher_weight = 1.0
    report = train(config, tmp_path / "student")["validation"]
    assert report["per_class"]["_silence_"]["recall"] == 1.0
    silences = report["per_class"]["_silence_"]["support"]
    assert report["accuracy"] == pytest.approx(silences / report["examples"])


def test_teacher_targets_mix_the_label_with_the_teachers_mean(tone_dataset):
    import numpy as np

    from kws.train import _targets

    class Teacher:
        def __init__(self, probabilities):
            self.probabilities = np.array(probabilities, dtype=np.float32)

        def scores(self, batch):
            return np.tile(self.probabilities, (len(batch), 1))

    config = run_config(tone_dataset, epochs=1)
    config.data.words = ["a", "b"]  # labels: _silence_, _unknown_, a, b
    config.train.teacher_weight = 0.25
    in_order = [0, 1, 2, 3]
    teachers = [(Teacher([0.5, 0.5, 0, 0]), in_order), (Teacher([0, 0.5, 0.5, 0]), in_order)]
    batch, labels = np.zeros((2, NUM_FRAMES, NUM_MFCC)), np.array([3, 0])
    targets = _targets(batch, labels, teachers, config)
    np.testing.assert_allclose(targets, [[0.0625, 0.125, 0.0625, 0.75], [0.8125, 0.125, 0.0625, 0.0]])
    np.testing.assert_array_equal(_targets(batch, labels, [], config), np.eye(4)[labels])
    # The second teacher trained on "b,a": its labels are _silence_, _unknown_, b, a.
    reordered = [teachers[0], (Teacher([0, 0.5, 0, 0.5]), [0, 1, 3, 2])]
    np.testing.assert_allclose(_targets(batch, labels, reordered, config), targets)


def test_a_teacher_with_the_same_words_in_another_order_is_read_in_this_runs_order(
    tone_run, tone_dataset, tmp_path
):
    import shutil

    from kws.train import _load_teachers

    run, _ = tone_run
    shutil.copytree(run, tmp_path / "teacher")
    raw = json.loads((run / "config.json").read_text())
    raw["data"]["words"] = raw["data"]["words"][::-1]
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(raw))
    config = run_config(tone_dataset, epochs=1)
    config.train.teachers = (str(tmp_path / "teacher"),)
    ((teacher, columns),) = _load_teachers(config)
    assert [teacher.labels[column] for column in columns] == config.labels != teacher.labels


def test_a_teacher_with_other_words_is_refused(tone_run, tone_dataset, tmp_path):
    import shutil

    run, _ = tone_run
    shutil.copytree(run, tmp_path / "teacher")
    raw = json.loads((run / "config.json").read_text())
    raw["data"]["words"] = [f"other{i}" for i, _ in enumerate(raw["data"]["words"])]  # as many labels
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(raw))
    config = run_config(tone_dataset, epochs=1)
    config.train.teachers = (str(tmp_path / "teacher"),)
    with pytest.raises(ModelError, match="teacher .*teacher has the labels"):
        train(config, tmp_path / "student")
    assert not (tmp_path / "student").exists()  # so the same --out can be used again


@pytest.mark.parametrize("refused", ["open", "fsync"])
def test_a_folder_that_cannot_be_fsynced_still_gets_the_file(tmp_path, monkeypatch, refused):
    from kws import files

    real = {"open": os.open, "fsync": os.fsync}

    def refusing_folders(*args):
        # A folder that may be written but not read (open), or a network or FUSE file system (fsync).
        target = args[0] if refused == "open" else f"/proc/self/fd/{args[0]}"
        if os.path.isdir(target):
            raise OSError(13 if refused == "open" else 22, "refused")
        return real[refused](*args)

    monkeypatch.setattr(files.os, refused, refusing_folders)
    files.write_json(tmp_path / "a.json", 1)
    files.write_files(tmp_path, {"b": "2"})
    assert (tmp_path / "a.json").read_text() == "1\n" and (tmp_path / "b").read_text() == "2"


def test_a_temporary_file_a_killed_kws_left_does_not_make_its_folder_taken(tmp_path):
    from kws import KwsError
    from kws.files import check_out_folder

    (tmp_path / ".tmp-4242-model.keras").write_bytes(b"half")  # kill -9 while it was written
    check_out_folder(tmp_path, "a run")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KwsError, match=r"holds other files \(notes.txt\)"):
        check_out_folder(tmp_path, "a run")


def test_two_processes_writing_one_file_each_write_it_whole(tmp_path):
    from kws.files import atomic_path

    target = tmp_path / "metrics.json"
    with atomic_path(target) as temporary:
        temporary.write_text('"first"')
        # Another kws writes the same file while this one is half way: it must not take or
        # rename this one's temporary file.
        code = f"from kws.files import write_json; write_json({str(target)!r}, 'second')"
        subprocess.run([sys.executable, "-c", code], check=True)
        assert json.loads(target.read_text()) == "second"
    assert json.loads(target.read_text()) == "first"
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


def test_written_files_reach_the_disk_before_their_rename_and_the_rename_after(tmp_path, monkeypatch):
    from kws import files

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        files.os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd),
    )
    monkeypatch.setattr(files.os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    files.write_json(tmp_path / "a.json", 1)
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith("a.json") and events[0][1] != str(tmp_path / "a.json")  # the temporary
    assert events[2] == ("fsync", str(tmp_path))
    events.clear()
    files.write_files(tmp_path, {"b": "1", "c": b"2"})
    assert [kind for kind, _ in events] == ["fsync", "fsync", "replace", "replace", "fsync"]
    assert events[-1] == ("fsync", str(tmp_path))


def test_a_failed_atomic_write_leaves_neither_its_temporary_file_nor_the_target(tmp_path):
    from kws.files import atomic_path

    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("the disk filled")
    assert list(tmp_path.iterdir()) == []
