"""The model shipped inside the package: complete, self-describing, used when no --model is given,
and as good on the real validation clips as its manifest says."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_validation

from kws.cli import main
from kws.runtime import BUILT_IN_MODEL, Model, resolve

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "stop", "go"]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((BUILT_IN_MODEL / "manifest.json").read_text())


def test_built_in_model_is_complete_and_calibrated(manifest):
    tflite, resolved = resolve(None)
    assert resolved == manifest and tflite.read_bytes()[4:8] == b"TFL3"
    assert manifest["labels"] == ["_silence_", "_unknown_", *KEYWORDS]
    thresholds = manifest["detection"]["thresholds"]
    assert set(thresholds) == set(KEYWORDS) and all(0.5 <= t <= 1 for t in thresholds.values())
    assert manifest["accuracy"]["int8"] >= 0.93 and manifest["accuracy"]["int8_drop_points"] <= 0.5
    assert manifest["streaming"]["keywords"] > 1000 and manifest["streaming"]["real_speech"]["hours"] > 0.2
    card = (BUILT_IN_MODEL / "MODEL_CARD.md").read_text()
    assert f"int8 {manifest['accuracy']['int8']:.2%}" in card


def test_built_in_model_ships_the_microcontroller_files_of_its_own_int8_model(manifest):
    from kws.export import c_array, c_frontend_sources

    header, source = c_array((BUILT_IN_MODEL / "model_int8.tflite").read_bytes(), manifest)
    wanted = {"model_data.h": header, "model_data.cc": source}
    wanted |= c_frontend_sources(manifest["input"]["scale"], manifest["input"]["zero_point"])
    assert {name: (BUILT_IN_MODEL / name).read_text() for name in wanted} == wanted


def test_built_in_models_calibration_warnings_are_what_calibration_says_today(manifest):
    from kws.stream_eval import warn

    streaming = manifest["streaming"]
    today = warn(streaming, streaming["stream_hours"], streaming["target_fa_per_hour"])
    assert streaming["warnings"] == today and today  # the shared data's stream is too short for 0.5 / h


def test_readme_quotes_the_built_in_models_own_figures(manifest):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## How good it is") :]
    table = table[: table.index("**Below target.**")]
    streaming, sizes = manifest["streaming"], manifest["sizes"]
    assert f"**{100 * manifest['accuracy']['int8']:.2f} %**" in table
    assert f"**{100 * streaming['recall']:.1f} %**, {streaming['false_accepts_per_hour']:.2f} false" in table
    assert f"{sizes['int8_bytes']:,} B; {sizes['tflm_arena_bytes']:,} B" in table


def test_kws_detect_uses_the_built_in_model_without_model_flag(tmp_path, capsys, manifest):
    import soundfile as sf

    silence = tmp_path / "quiet.wav"
    sf.write(silence, np.zeros(16000 * 3, np.float32), 16000)
    assert main(["detect", str(silence), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["name"] == manifest["name"]
    built_in = (BUILT_IN_MODEL / manifest["files"]["int8"]).read_bytes()
    assert report["model"]["sha256"] == hashlib.sha256(built_in).hexdigest()
    assert report["duration"] == pytest.approx(3.0) and report["detections"] == []


@pytest.mark.integration
def test_built_in_model_scores_its_recorded_accuracy_on_real_clips(shared_data, manifest):
    from kws.features import mfcc

    validation = shared_validation(manifest, shared_data)
    predictions = Model.load(None).scores(mfcc(validation.audio)).argmax(axis=1)
    assert len(predictions) == manifest["accuracy"]["examples"]
    assert (predictions == validation.labels).mean() == pytest.approx(manifest["accuracy"]["int8"], abs=1e-4)
