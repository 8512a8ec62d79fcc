"""End to end on the real recordings in ../shared/data: train briefly, evaluate, export; the built-in
model under TFLM."""

import importlib.util
import json

import numpy as np
import pytest
from conftest import need, shared_validation

from kws.cli import main

pytestmark = pytest.mark.integration
WORDS = "yes,no,up,down,left,right,stop,go"


@pytest.fixture(scope="module")
def short_run(shared_data, tmp_path_factory):
    """Two epochs on the shared subset (about a minute), exported."""
    run = tmp_path_factory.mktemp("runs") / "s8"
    data, negatives = shared_data / "speech_commands", shared_data / "librispeech"
    args = ["train", "--data", str(data), "--negatives", str(negatives), "--words", WORDS, "--epochs", "2"]
    assert main([*args, "--out", str(run)]) == 0
    assert main(["export", str(run)]) == 0
    return run


def test_two_epochs_on_real_speech_learn_and_eval_reproduces_validation(short_run, shared_data, capsys):
    validation = json.loads((short_run / "metrics.json").read_text())["validation"]
    assert validation["examples"] > 2000
    per_class = validation["per_class"]
    assert per_class["_unknown_"]["support"] == per_class["_silence_"]["support"] > 200
    assert validation["accuracy"] > 0.7, "two epochs on real speech should already beat chance by far"

    capsys.readouterr()
    data, negatives = shared_data / "speech_commands", shared_data / "librispeech"
    args = ["eval", "--model", str(short_run), "--data", str(data), "--negatives", str(negatives)]
    assert main([*args, "--split", "validation", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(validation["accuracy"])
    assert result["confusion"]["labels"] == ["_silence_", "_unknown_", *WORDS.split(",")]


def test_int8_export_keeps_the_float_accuracy(short_run):
    manifest = json.loads((short_run / "export" / "manifest.json").read_text())
    accuracy = manifest["accuracy"]
    assert accuracy["examples"] > 2000
    assert accuracy["int8_drop_points"] <= 1.5  # 0.5 is the bar for the fully trained model
    assert 10_000 < manifest["sizes"]["int8_bytes"] < 70_000
    assert 10_000 < manifest["sizes"]["tflm_arena_bytes"] < 40_000


@pytest.fixture(scope="module")
def real_inputs(shared_data):
    """The built-in model and the quantized features of 300 real validation examples."""
    from kws.features import mfcc
    from kws.runtime import Model

    model = Model.load(None)
    examples = shared_validation(model.manifest, shared_data)
    picks = np.random.default_rng(0).permutation(len(examples.labels))[:300]
    return model.prepare(mfcc(examples.audio[picks]))


def test_tflite_micro_gives_litert_answers_on_real_clips(real_inputs):
    need(importlib.util.find_spec("tflite_micro"), "tflite-micro is not installed: pip install -e '.[train]'")
    from tflite_micro.python.tflite_micro import runtime as tflm

    from kws.runtime import Model, resolve

    tflite, _ = resolve(None)
    micro = tflm.Interpreter.from_bytes(tflite.read_bytes())
    device = []
    for example in real_inputs:
        micro.set_input(example[None], 0)
        micro.invoke()
        device.append(micro.get_output(0)[0].copy())
    device = np.array(device, dtype=np.int32)

    reference = Model.load(None, reference_kernels=True).raw_scores(real_inputs).astype(np.int32)
    default = Model.load(None).raw_scores(real_inputs).astype(np.int32)
    assert len(device) == 300
    # LiteRT's reference kernels round as TFLM does: the same top class on every clip and no
    # output more than one quantization step apart (measured: identical on 600 of 600 clips).
    assert (device.argmax(axis=1) == reference.argmax(axis=1)).all()
    assert np.abs(device - reference).max() <= 1
    # LiteRT's default XNNPACK kernels requantize their own way: values differ from TFLM by
    # more than one step on ~2 % of outputs, the top class on ~0.3 % of clips.
    assert (device.argmax(axis=1) == default.argmax(axis=1)).mean() >= 0.98
