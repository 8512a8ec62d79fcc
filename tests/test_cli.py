"""What a user sees when a command-line value is wrong: one line naming the value and what to do,
exit status 2, no traceback; and what detect --top-k and eval --json report."""

from __future__ import annotations

import argparse
import ast
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import make_dataset, tone

from kws import audio
from kws.cli import SPLIT_NAMES, main
from kws.data import scan
from kws.runtime import BUILT_IN_MODEL, MANIFEST_FILE

TRAIN_EXTRA = 'pip install "kws[train]"'


def _usage_error(argv: list[str], capsys) -> str:
    """The error line of an argument argparse refused (it exits with status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    "argv, error",
    [
        (
            ["detect", "a.wav", "--threshold", "abc"],
            "argument --threshold: must be a score in (0, 1], got abc",
        ),
        (["detect", "a.wav", "--threshold", "2"], "argument --threshold: must be a score in (0, 1], got 2"),
        (["listen", "--threshold", "stop=2"], "argument --threshold: must be a score in (0, 1], got 2"),
        (
            ["eval", "--stream", "--threshold", "stop=0.9,=0.5"],
            "argument --threshold: must be a score or KEYWORD=SCORE pairs (stop=0.99,go=0.95), got "
            "stop=0.9,=0.5",
        ),
        (
            ["detect", "a.wav", "--top-k", "x"],
            "argument --top-k: must be a whole number, at least 1, got x",
        ),
        (["serve", "--port", "abc"], "argument --port: must be from 1 to 65535, got abc"),
        (["serve", "--workers", "1.5"], "argument --workers: must be a whole number, at least 1, got 1.5"),
        (
            ["serve", "--max-seconds", "x"],
            "argument --max-seconds: must be a positive number of seconds, got x",
        ),
        (
            ["listen", "--seconds", "abc"],
            "argument --seconds: must be a positive number of seconds, got abc",
        ),
        (
            ["train", "--seed", "abc"],
            "argument --seed: must be a whole number from 0 to 4294967295, got abc",
        ),
        (
            ["train", "--silence-share", "a"],
            "argument --silence-share: must be a fraction in [0, 1), got a",
        ),
        (
            ["synth", "--words", "yes,a/b", "--out", "x"],
            "argument --words: keyword 'a/b' cannot be a folder's name: no / or \\, and no leading '.'",
        ),
        (
            ["synth", "--words", "_silence_", "--out", "x"],
            "argument --words: keyword '_silence_' may not start with '_' (reserved for classes)",
        ),
        (
            ["export", "run", "--target-fa", "abc"],
            "argument --target-fa: must be a number of false accepts per hour, 0 or more, got abc",
        ),
        (
            ["calibrate", "m", "--hop-ms", "abc"],
            "argument --hop-ms: must be a multiple of the 20 ms frame hop, at most 1000 (the model's "
            "window), got abc",
        ),
        (
            ["calibrate", "m", "--hop-ms", "10000"],
            "argument --hop-ms: must be a multiple of the 20 ms frame hop, at most 1000 (the model's "
            "window), got 10000",
        ),
        (
            ["calibrate", "m", "--average-ms", "abc"],
            "argument --average-ms: must be a number of milliseconds above 0, at most 1000, got abc",
        ),
        (
            ["calibrate", "m", "--average-ms", "10000"],
            "argument --average-ms: must be a number of milliseconds above 0, at most 1000, got 10000",
        ),
    ],
)
def test_an_unparsable_or_out_of_range_option_says_what_it_must_be(argv, error, capsys):
    assert _usage_error(argv, capsys) == f"kws {argv[0]}: error: {error}"


@pytest.mark.parametrize("name", ["nowhere", "notes.txt"])
def test_a_bad_kws_model_is_named_as_the_variable_not_as_model(name, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.setenv("KWS_MODEL", str(tmp_path / name))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kws serve: error: KWS_MODEL {tmp_path / name}")
    assert "--model" not in err


def test_a_file_given_as_data_folder_is_called_a_file(tmp_path, capsys):
    clip = tmp_path / "clip.flac"
    sf.write(clip, tone(400.0), 16000)
    assert main(["eval", "--data", str(clip)]) == 2
    assert f"kws eval: error: {clip} is a file, not a data folder: pass --data DIR" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_evaluating(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["eval", "--data", str(tiny_dataset), "--plot", str(tmp_path / "c.png")]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"kws eval: error: --plot needs matplotlib, not installed here: {TRAIN_EXTRA}"
    assert out == ""


def test_a_run_folder_without_keras_asks_for_the_train_extra(tiny_dataset, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "keras", None)
    assert main(["eval", "--model", str(run), "--data", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kws eval: error: scoring the run folder {run} (its Keras model) needs keras")
    assert err.strip().endswith(TRAIN_EXTRA)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{}", "has no 'data' settings"),
        ("not json", "is not valid JSON"),
        ("[]", "holds settings kws cannot use"),
    ],
)
@pytest.mark.parametrize("command", [["export"], ["train", "--resume"]])
def test_a_corrupt_run_config_names_the_file(command, content, problem, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(content)
    assert main([*command, str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kws {command[0]}: error: {run / 'config.json'} {problem}")
    assert "restore the run's copy, or train a new run" in err


@pytest.mark.parametrize(
    "argv, error",
    [
        (
            ["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/run"],
            "data folder {tmp}/nowhere does not exist",
        ),
        (
            ["train", "--data", "{tmp}", "--negatives", "{tmp}/speech", "--out", "{tmp}/run"],
            "--negatives folder {tmp}/speech does not exist",
        ),
        (
            ["train", "--data", "{tmp}", "--extra", "{tmp}/synth", "--out", "{tmp}/run"],
            "--extra folder {tmp}/synth does not exist",
        ),
        (
            ["train", "--data", "{tmp}/data", "--words", "yes,left", "--out", "{tmp}/run"],
            "no folder 'left' in {tmp}/data: check the spelling in --words",
        ),
        (["export", "{tmp}/nowhere"], "run folder {tmp}/nowhere does not exist"),
        (["eval", "--model", "{tmp}", "--data", "{tmp}"], "{tmp}/config.json is not valid JSON"),
        (
            [
                "train",
                "--data",
                "{tmp}/data",
                "--words",
                "yes",
                "--teacher",
                "{tmp}/nowhere",
                "--out",
                "{tmp}/run",
            ],
            "teacher {tmp}/nowhere: run folder {tmp}/nowhere does not exist",
        ),
    ],
)
def test_a_bad_path_is_reported_before_tensorflow_loads(argv, error, tmp_path):
    # A fresh interpreter, as this one may have imported TensorFlow for other tests.
    script = (
        "import sys; from kws.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    (tmp_path / "config.json").write_text("not json")  # a corrupt run folder, for eval
    make_dataset(tmp_path / "data", speakers_per_word=3)  # usable data, for the teacher
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False", "False"]
    assert f"kws {argv[0]}: error: {error.format(tmp=tmp_path)}" in done.stderr


def test_detect_top_k_lists_the_scores_in_the_text_too(tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, tone(400.0), 16000)
    assert main(["detect", str(clip), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    scores = [line for line in lines if line.startswith("  scores: ")]
    assert len(scores) == 1 and scores[0].count(",") == 1  # two labels with their scores
    assert main(["detect", str(clip)]) == 0
    assert "scores:" not in capsys.readouterr().out  # only asked for
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(tone(400.0), 3), 16000)
    assert main(["detect", str(long), "--top-k", "2"]) == 0
    assert "  scores: none, as the recording is over 1.5 s long" in capsys.readouterr().out.splitlines()


def test_detect_reads_a_file_from_standard_input_as_it_reads_the_file(tmp_path, capsys, monkeypatch):
    clip = tmp_path / "clip.flac"
    sf.write(clip, tone(400.0), 16000)  # a clip, so that its class scores are listed too
    assert main(["detect", str(clip), "--json", "--top-k", "10"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(clip.read_bytes())))
    assert main(["detect", "-", "--json", "--top-k", "10"]) == 0  # as ffmpeg ... -f wav - | kws detect -
    assert json.loads(capsys.readouterr().out) == {**from_file, "file": "-"}
    assert len(from_file["scores"]) == 10
    # Named twice, and beside a file: read once, and listed with the file.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(clip.read_bytes())))
    assert main(["detect", "-", str(clip), "-", "--json"]) == 0
    assert [report["file"] for report in json.loads(capsys.readouterr().out)] == ["-", str(clip)]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["detect", "-"]) == 1
    assert capsys.readouterr().err == "kws detect: skipping -: is empty\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin", [Terminal(), None])  # typed at, or closed (kws detect - <&-)
def test_detect_minus_without_a_pipe_says_what_it_is_for_and_a_file_named_minus_is_a_file(
    stdin, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["detect", "-"]) == 2
    assert capsys.readouterr().err == (
        "kws detect: error: - reads a recording piped in, as in: ffmpeg -i talk.m4a -f wav - | kws detect -\n"
    )
    sf.write(tmp_path / "-", tone(400.0), 16000, format="WAV")
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "./-", "--json"]) == 0  # the file, standard input unread
    assert json.loads(capsys.readouterr().out)["duration"] == 1.0


def test_eval_json_names_the_built_in_model(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no"))
    assert main(["eval", "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == json.loads((BUILT_IN_MODEL / MANIFEST_FILE).read_text())["name"]


def test_eval_warns_of_keywords_its_split_does_not_hold(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no"))
    lists = data / "testing_list.txt"
    lists.write_text("".join(line for line in lists.read_text().splitlines(True) if line.startswith("yes/")))
    hint = " (--split validation scores the validation list)"
    for split, missing, end in (("validation", "up, down", "\n"), ("test", "no, up, down", hint)):
        assert main(["eval", "--data", str(data), "--split", split]) == 0
        warning = f"warning: the {SPLIT_NAMES[split]} split of {data} holds no clips of {missing}, "
        assert (
            warning + "left, right, stop, go: its accuracy says nothing about them" + end
            in capsys.readouterr().err
        )
    package = tmp_path / "package"  # the official test set's layout: no other split to point to
    shutil.copytree(data / "yes", package / "yes")
    shutil.copytree(data / "_background_noise_", package / "_silence_")
    assert main(["eval", "--data", str(package)]) == 0
    assert capsys.readouterr().err.endswith("its accuracy says nothing about them\n")
    # A keyword of the package the model lacks (the official one has "on" and "off"): told, not hidden.
    shutil.copytree(data / "no", package / "on")
    assert main(["eval", "--data", str(package)]) == 0
    assert (
        f"note: {package} has clips of on, which this model does not spot: they are scored as _unknown_, "
        "and listed with the other words below\n"
    ) in capsys.readouterr().err


def test_eval_on_a_folder_without_split_lists_says_how_many_clips_the_hash_left_it(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", speakers_per_word=12, words=("yes", "no"))
    for name in ("validation_list.txt", "testing_list.txt"):
        (data / name).unlink()  # own recordings: the speaker hash alone splits them
    assert main(["eval", "--data", str(data), "--json"]) == 0
    out, err = capsys.readouterr()
    per_class = json.loads(out)["per_class"]
    scored = per_class["yes"]["support"] + per_class["no"]["support"]
    assert 0 < scored < 24 and scored == sum(clip.split == "testing" for clip in scan(data))
    assert err.startswith(
        f"note: {data} has no validation_list.txt or testing_list.txt, so the speaker hash of its file "
        f"names chose the testing split: {scored} of its 24 keyword clips are scored; to score every "
        "clip, add an empty _unknown_ folder to it"
    )
    assert "--split validation scores the validation list" not in err  # there is none


def test_calibrate_without_matplotlib_fails_before_scoring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    scored = []
    # The name calibration calls; patching kws.stream_eval's would bind into kws.export for good,
    # were this test the first to import it.
    monkeypatch.setattr("kws.export.stream_test", lambda *args, **kwargs: scored.append(args))
    copy = shutil.copytree(BUILT_IN_MODEL, tmp_path / "export")
    assert main(["calibrate", str(copy)]) == 2
    need = "calibrate (it redraws the export's DET curve) needs matplotlib, not installed here"
    assert capsys.readouterr().err.strip() == f"kws calibrate: error: {need}: {TRAIN_EXTRA}"
    assert scored == []


def trained_looking_run(folder: Path) -> Path:
    """A run folder export's first check takes (config and model file), holding no real model."""
    from conftest import tone_run_config

    (folder / "run").mkdir()
    (folder / "run" / "config.json").write_text(json.dumps(tone_run_config(folder, epochs=1).to_dict()))
    (folder / "run" / "model.keras").write_bytes(b"never loaded")
    return folder / "run"


def test_export_to_a_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "export"
    out.write_text("")
    assert main(["export", str(trained_looking_run(tmp_path)), "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"kws export: error: --out {out} is a file: an export is a folder; pick another --out"
    )


def test_an_export_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    run = trained_looking_run(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "notes.txt" / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"{tmp_path / 'notes.txt'} is a file, so no folder can be made in it; pick another --out"
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "MODEL_CARD.md").write_text("my own notes")
    assert main(["export", str(run), "--out", str(tmp_path / "mine")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kws export: error: --out {tmp_path / 'mine'} holds other files (MODEL_CARD.md) and no "
        "manifest.json: an export goes into a new or empty folder, or over an earlier one; pick another --out"
    )
    (run / "export").mkdir()  # its default folder
    (run / "export" / "MODEL_CARD.md").write_text("my own notes")
    assert main(["export", str(run)]) == 2
    assert capsys.readouterr().err.startswith(
        f"kws export: error: the export folder {run / 'export'} holds other files (MODEL_CARD.md)"
    )
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "mine")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "holds other files (MODEL_CARD.md): a run goes into a new or empty folder; pick another --out"
        )
    )
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")  # as a disk that is not mounted leaves it
    for out in (tmp_path / "gone", tmp_path / "gone" / "run"):
        assert main(["train", "--data", str(tmp_path), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"kws train: error: --out {out}: {tmp_path / 'gone'} links to {tmp_path / 'unmounted'}, which "
            "does not exist; pick another --out"
        )

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    assert main(["train", "--out", str(tmp_path / "runs" / "new")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kws train: error: --out {tmp_path / 'runs' / 'new'}: cannot write in {tmp_path} (Read-only file "
        "system); pick another --out"
    )


def test_train_without_data_checks_its_words_and_folders_before_downloading(tmp_path, monkeypatch, capsys):
    downloads = []
    monkeypatch.setattr("kws.download.download_dataset", lambda *args: downloads.append(args))
    run = ["train", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        main([*run, "--words", "yes,_no"])
    assert "argument --words: keyword '_no' may not start with '_'" in capsys.readouterr().err
    assert main([*run, "--negatives", str(tmp_path / "librispeech")]) == 2
    assert f"--negatives folder {tmp_path / 'librispeech'} does not exist" in capsys.readouterr().err
    assert downloads == []


def test_training_without_tensorflow_asks_for_the_train_extra(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "keras", None)
    assert main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"kws train: error: training needs keras, not installed here: {TRAIN_EXTRA}"
    assert not (tmp_path / "run").exists()


def test_an_interrupted_training_run_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    import kws.train

    data = make_dataset(tmp_path / "data", speakers_per_word=2, words=("yes", "no"))
    run = tmp_path / "run"

    def interrupted(config, run_dir, resume=False):
        (run_dir / "config.json").parent.mkdir(parents=True)
        (run_dir / "config.json").write_text("{}")  # what train() writes before its first epoch
        raise KeyboardInterrupt

    monkeypatch.setattr(kws.train, "train", interrupted)
    assert main(["train", "--data", str(data), "--words", "yes,no", "--out", str(run)]) == 130
    assert (
        capsys.readouterr().err == f"\nkws train: interrupted; continue it with: kws train --resume {run}\n"
    )


def test_output_cut_short_by_its_reader_is_no_error(tmp_path):
    for index in range(400):  # more lines than a pipe's buffer holds
        sf.write(tmp_path / f"{index:03}.wav", tone(400.0), 16000)
    files = sorted(str(path) for path in tmp_path.glob("*.wav"))
    detect = subprocess.Popen(
        [sys.executable, "-m", "kws", "detect", *files], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert detect.stdout.readline().startswith(files[0].encode())
    detect.stdout.close()  # as `| head -1` does
    assert detect.wait(timeout=120) == 0
    assert detect.stderr.read() == b""


def test_eval_warns_when_negatives_hold_out_a_speaker_the_model_trained_on(
    tiny_dataset, negatives_dir, capsys
):
    from dataclasses import asdict

    from kws.cli import _evaluation_data
    from kws.data import DataConfig, NegativeBank

    data = asdict(DataConfig(str(tiny_dataset), words=["yes", "no"]))
    held_out = NegativeBank([str(negatives_dir)], DataConfig.negatives_validation_share).speakers["held_out"]
    others = NegativeBank([str(negatives_dir)], 1.0).speakers["held_out"]
    for trained, warned in ((sorted(set(others) - set(held_out)), False), (held_out, True)):
        training = {"data": data, "negatives": {"training": {"speakers": trained}}}
        _evaluation_data(training, None, [negatives_dir], "validation")
        err = capsys.readouterr().err
        assert (
            f"warning: speakers {', '.join(held_out)} of --negatives are held out here but the model trained"
            in err
        ) == warned


def test_a_plot_that_cannot_be_written_is_refused_before_any_scoring(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    for plot, message in [
        (
            tmp_path / "det.jpg",
            f"--plot {tmp_path / 'det.jpg'}: name a .png file, as the plot is a PNG image",
        ),
        (tmp_path, f"--plot {tmp_path}: name a .png file"),
        (tmp_path / "x.png", None),  # fine: scoring starts, and stops at the missing data
        (
            tmp_path / "notes.txt" / "det.png",
            f"{tmp_path / 'notes.txt'} is a file, so no folder can be made in it",
        ),
    ]:
        for stream in ([], ["--stream"]):
            assert main(["eval", *stream, "--data", str(tmp_path / "nowhere"), "--plot", str(plot)]) == 2
            err = capsys.readouterr().err
            assert (message or f"data folder {tmp_path / 'nowhere'} does not exist") in err


def test_calibrate_refuses_an_export_it_cannot_write_before_scoring(tmp_path, monkeypatch, capsys):
    from kws.runtime import BUILT_IN_MODEL

    copy = shutil.copytree(BUILT_IN_MODEL, tmp_path / "export")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    monkeypatch.setattr("kws.export.recalibrate", lambda *args: pytest.fail("it scored"))
    assert main(["calibrate", str(copy)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kws calibrate: error: MODEL {copy}: cannot write in {copy} (Read-only file system); calibrate "
        "rewrites the export's files: run it on a copy you can write"
    )


def test_a_word_given_twice_is_one_word_and_words_differing_in_case_alone_are_refused():
    from kws.cli import _words

    assert _words(" yes,no,yes , up,no") == ["yes", "no", "up"]
    with pytest.raises(
        argparse.ArgumentTypeError, match="keywords that differ only in letter case: Yes, yes"
    ):
        _words("Yes,yes")


def test_calibrate_refuses_the_built_in_model_itself(capsys):
    from kws.runtime import BUILT_IN_MODEL

    assert main(["calibrate", str(BUILT_IN_MODEL)]) == 2
    assert capsys.readouterr().err.startswith(
        f"kws calibrate: error: MODEL {BUILT_IN_MODEL} is the built-in model: calibrate rewrites the "
        "export's files: run it on a copy you can write"
    )


def test_calibrate_refuses_a_manifest_the_other_commands_refuse_in_their_words(tmp_path, monkeypatch, capsys):
    from kws.runtime import BUILT_IN_MODEL

    copy = shutil.copytree(BUILT_IN_MODEL, tmp_path / "export")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["detection"]["hop_frames"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("kws.export.recalibrate", lambda *args: pytest.fail("it scored"))
    assert main(["detect", str(copy / "nothing.wav"), "--model", str(copy)]) == 2
    refused = capsys.readouterr().err.split(": error: ", 1)[1]
    assert main(["calibrate", str(copy)]) == 2  # was a ValueError traceback
    assert capsys.readouterr().err == f"kws calibrate: error: {refused}"
    assert refused.startswith(f"{copy / 'model_int8.tflite'}: its manifest's detection settings are unusable")


@pytest.mark.parametrize("option", ["--hop-ms", "--average-ms"])
def test_the_models_whole_window_is_the_longest_hop_and_average(option):
    from kws.cli import build_parser

    assert (
        getattr(build_parser().parse_args(["calibrate", "m", option, "1000"]), option[2:].replace("-", "_"))
        == 1000
    )


def test_extra_folders_that_are_files_the_data_or_hold_a_keyword_in_another_case_are_refused(
    tmp_path, capsys, monkeypatch
):
    from kws.data import DataConfig, DataError, check_added_folders, check_folders

    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "synth" / "Yes").mkdir(parents=True)
    (tmp_path / "synth" / "Bed").mkdir(parents=True)
    (tmp_path / "lower" / "no").mkdir(parents=True)
    data = tmp_path / "data"
    (data / "bed").mkdir(parents=True)
    for extra, words, message in [
        ("notes.txt", ["yes", "no"], "is a file: pass the folder of word folders that holds it"),
        ("synth", ["yes", "no"], "synth/Yes is not the keyword 'yes': folder names are case-sensitive"),
        (
            "synth",
            ["yes"],
            r"merge it into the keyword's\), or spell it 'Yes' in --words$",
        ),  # no yes/ anywhere
        ("synth", ["bed"], r"synth/Bed is not the keyword 'bed'.*merge it into the keyword's\)$"),  # data/bed
        ("lower", ["yes", "No"], "lower/no is not the keyword 'No': folder names are case-sensitive"),
        ("data", ["yes"], "is the data folder .*, or inside it or around it: --extra is for clips the data"),
        ("data/bed", ["yes"], "is the data folder"),  # its clips would train twice
        (".", ["yes"], "is the data folder"),
    ]:
        with pytest.raises(DataError, match=message):
            check_folders(DataConfig(str(data), words=words, extra=[str(tmp_path / extra)]))
    check_folders(DataConfig(str(data), words=["Yes"], extra=[str(tmp_path / "synth")]))  # its own case
    # No --data: the data set is downloaded later, and --extra may lie anywhere, here too.
    monkeypatch.chdir(tmp_path)
    check_added_folders(DataConfig("", words=["Yes"], extra=["synth"]))
    assert main(["synth", "--words", "yes", "--out", str(tmp_path / "notes.txt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kws synth: error: --out {tmp_path / 'notes.txt'} is a file: synthesized speech is a folder; pick "
        "another --out"
    )


@pytest.mark.parametrize("training", [None, {"data": {"data_dir": "d", "speakers": 3}}])
@pytest.mark.parametrize("command", [["eval"], ["eval", "--stream"], ["calibrate"]])
def test_a_manifest_without_a_usable_training_record_is_named(command, training, tmp_path, capsys):
    copy = shutil.copytree(BUILT_IN_MODEL, tmp_path / "export")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["training"] = training
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    model = copy / "model_int8.tflite"
    where = ["--model", str(model)] if command[0] == "eval" else [str(model)]
    assert main([*command, *where, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{model}: its manifest has no usable training record (training.data)" in err
    assert "use the manifest kws export wrote beside the model" in err


def test_the_inference_modules_import_nothing_of_training():
    # A fresh interpreter: this one may have imported TensorFlow for other tests.
    inference = ["audio", "features", "runtime", "stream", "listen", "server", "workers", "options"]
    script = (
        f"import sys; import {', '.join(f'kws.{name}' for name in inference)}; "
        "watched = ('kws', 'tensorflow', 'keras', 'sounddevice'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in watched))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert ast.literal_eval(done.stdout) == sorted(["kws", *(f"kws.{name}" for name in inference)])


def test_a_file_name_that_is_not_utf8_is_read_and_printed_escaped(tmp_path, capsys):
    latin1 = tmp_path / os.fsdecode(b"caf\xe9_nohash_0.wav")  # from an old Latin-1 disk
    sf.write(os.fsencode(latin1), tone(500), 16000)
    assert main(["detect", str(latin1), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["file"] == str(latin1) and report["duration"] == 1.0
    assert main(["detect", str(latin1)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}/caf\\udce9_nohash_0.wav: 1.00 s, ")
    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes",))
    latin1.rename(data / "yes" / latin1.name)
    assert len([clip for clip in scan(data) if clip.word == "yes"]) == 4  # the speaker hash splits it too


def test_a_recording_damaged_midway_reports_what_came_before_with_a_warning(tmp_path, capsys):
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.flac"
    sf.write(whole, (0.1 * rng.standard_normal(16000 * 30)).astype(np.float32), 16000)
    cut = tmp_path / "cut.flac"  # a copy that stopped at 60 %
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    assert main(["detect", str(cut), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # Decoded 10 s at a time: the block that holds the damage is lost with it.
    assert report["duration"] == audio.BLOCK_SECONDS and report["file"] == str(cut)
    assert report["damaged"].startswith(f"{cut}: cannot decode audio (")
    assert f"kws detect: warning: {report['damaged']}; " in captured.err
    assert "; the detections are those of its first 10.00 s\n" in captured.err


def test_detect_on_a_folder_names_recordings_it_cannot_read_and_folders_it_cannot_open(
    tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "memos"
    for sub in ("old", "lost+found", ".Trash-1000"):
        (folder / sub).mkdir(parents=True)
    sf.write(folder / "a.wav", tone(500), 16000)
    for name in ("b.m4a", "c.M4A", "d.webm", "notes.txt"):
        (folder / name).write_bytes(b"not read")
    assert main(["detect", str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{folder / 'a.wav'}: 1.00 s")
    # Notes are left out quietly; recordings kws cannot read are named, with what to do.
    assert captured.err == (
        f"kws detect: warning: left out {folder}'s recordings in formats kws cannot read (.m4a 2, "
        f".webm 1): {audio.CONVERT}\n"
    )
    scandir = os.scandir

    def no_permission(path, unreadable=("lost+found", ".Trash-1000")):
        if str(path).endswith(unreadable):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    assert main(["detect", str(folder)]) == 0  # a disk's own folders are no recordings of the user's
    capsys.readouterr()
    monkeypatch.setattr(os, "scandir", lambda path: no_permission(path, ("old",)))
    assert main(["detect", str(folder)]) == 2  # not a shorter list that looks whole
    assert capsys.readouterr().err == (
        f"kws detect: error: cannot read the folder {folder / 'old'} (Permission denied): check its "
        "mode (ls -ld)\n"
    )


def test_export_of_a_file_that_is_no_run_says_so_rather_than_blaming_the_export_folder(tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, tone(500), 16000)
    assert main(["export", str(clip)]) == 2
    assert (
        capsys.readouterr().err
        == f"kws export: error: {clip} is not a kws run folder: it has no config.json\n"
    )


def test_signals_stop_commands_as_ctrl_c_does_but_one_set_aside_before_is_left_alone():
    from kws import Stopped, stopped_by_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a process
    try:
        with stopped_by_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(Stopped) as stopped:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises at once
            assert stopped.value.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_main_runs_outside_the_main_thread_leaving_signals_alone(tmp_path, capsys):
    import threading

    clip = tmp_path / "clip.wav"
    sf.write(clip, tone(500), 16000)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["detect", str(clip)])))
    thread.start()
    thread.join()
    assert codes == [0] and capsys.readouterr().out.startswith(f"{clip}: 1.00 s")


def test_a_command_stopped_by_a_closed_terminal_exits_129_though_it_cannot_say_so(monkeypatch):
    import io

    from kws import Stopped

    def hung_up(args):
        raise Stopped("SIGHUP")

    class ClosedTerminal(io.TextIOBase):
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("kws.cli.cmd_detect", hung_up)
    monkeypatch.setattr(sys, "stderr", ClosedTerminal())
    assert main(["detect", "clip.wav"]) == 128 + signal.SIGHUP
