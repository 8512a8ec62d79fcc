"""Export of a trained run: the three .tflite files, manifest, MCU bundle, TensorFlow-free runtime."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import WORD_TONES, need, tone

from kws import export, runtime
from kws.features import NUM_FRAMES, NUM_MFCC


@pytest.fixture(scope="module")
def exported(tone_export):
    return tone_export


def files_of(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def runs_on_tflm(tflite: bytes, arena_size: int) -> bool:
    """Whether TFLM's interpreter can run the model in an arena of ``arena_size`` bytes."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    try:
        with runtime.quiet_stderr():
            interpreter = tflm.Interpreter.from_bytes(tflite, arena_size=arena_size)
            details = interpreter.get_input_details(0)
            interpreter.set_input(np.zeros(details["shape"], dtype=details["dtype"]), 0)
            interpreter.invoke()
    except RuntimeError:
        return False
    return True


def compile_with(header_dir, tmp_path, *flags):
    """g++ on a device-like program that sizes its arena with model_data.h's KWS_ARENA_BYTES."""
    need(shutil.which("g++"), "g++ is not installed (Debian/Ubuntu: apt-get install g++)")
    (tmp_path / "main.cc").write_text(
        '#include <cstdio>\n#include "model_data.h"\n'
        "alignas(16) static unsigned char arena[KWS_ARENA_BYTES];\n"
        'int main() { std::printf("%u %zu", kws_model_data_len, sizeof arena); }\n'
    )
    sources = [str(tmp_path / "main.cc"), str(header_dir / "model_data.cc")]
    command = ["g++", "-std=c++11", *flags, "-I", str(header_dir), *sources, "-o", str(tmp_path / "main")]
    return subprocess.run(command, capture_output=True, text=True)


def test_export_writes_every_file(exported):
    out, manifest = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "model_int8.tflite",
        "model_float16.tflite",
        "model_float32.tflite",
        "manifest.json",
        "model_data.cc",
        "model_data.h",
        "kws_frontend.c",
        "kws_frontend.h",
        "MODEL_CARD.md",
        "det_curve.png",
    } <= names
    assert not [n for n in names if n.startswith(".tmp-")]
    sizes = manifest["sizes"]
    assert sizes["int8_bytes"] < sizes["float16_bytes"] < sizes["float32_bytes"]
    assert sizes["int8_bytes"] == (out / "model_int8.tflite").stat().st_size
    # manifest.json and the manifest inside the .tflite come from one dict: only the file sizes differ.
    embedded = runtime.embedded_manifest((out / "model_int8.tflite").read_bytes())
    written = json.loads((out / "manifest.json").read_text())
    file_sizes = {key: written["sizes"].pop(key) for key in export.FILE_SIZES}
    assert embedded == written and file_sizes == {key: sizes[key] for key in export.FILE_SIZES}
    # The float files' copies describe their own float tensors, not the int8 model's.
    for kind in ("float16", "float32"):
        copy = runtime.embedded_manifest((out / f"model_{kind}.tflite").read_bytes())
        assert {part: (copy[part]["dtype"], copy[part]["scale"]) for part in ("input", "output")} == {
            "input": ("float32", 0.0),
            "output": ("float32", 0.0),
        }
        assert copy["output"]["values"] == "logits" and {**copy, "input": None, "output": None} == {
            **written,
            "input": None,
            "output": None,
        }


def test_manifest_holds_what_running_the_model_needs(exported):
    _, manifest = exported
    assert manifest["labels"] == ["_silence_", "_unknown_", "yes", "no", "up", "down"]
    assert manifest["input"]["shape"] == [1, NUM_FRAMES, NUM_MFCC] and manifest["input"]["dtype"] == "int8"
    assert manifest["output"]["dtype"] == "int8" and manifest["output"]["scale"] > 0
    assert manifest["frontend"]["mel_fmax_hz"] == 4000.0
    accuracy = manifest["accuracy"]
    assert accuracy["int8"] > 0.8 and abs(accuracy["int8_drop_points"]) <= 5
    assert accuracy["int8_drop_points"] == pytest.approx(
        100 * (accuracy["float32"] - accuracy["int8"]), abs=1e-3
    )
    assert manifest["training"]["data"]["words"] == ["yes", "no", "up", "down"]


def test_the_model_card_counts_the_examples_its_accuracy_rests_on(exported):
    out, manifest = exported
    counts = manifest["accuracy"]["examples_per_class"]
    assert list(counts) == manifest["labels"] and sum(counts.values()) == manifest["accuracy"]["examples"]
    assert (
        f"- Accuracy over 6 classes ({manifest['accuracy']['examples']} examples, {counts['_silence_']} "
        f"_silence_, {counts['_unknown_']} _unknown_): "
    ) in (out / "MODEL_CARD.md").read_text()


def test_int8_model_is_full_integer_with_static_shapes(exported):
    from ai_edge_litert.interpreter import Interpreter

    out, _ = exported
    interpreter = Interpreter(model_path=str(out / "model_int8.tflite"))
    interpreter.allocate_tensors()
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= ops
    assert not ops & {"SHAPE", "PACK", "STRIDED_SLICE", "QUANTIZE", "DEQUANTIZE"}
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    float_tensors = [t for t in interpreter.get_tensor_details() if t["dtype"] == np.float32]
    assert not float_tensors


def test_exported_models_end_with_logits_and_the_runtime_applies_the_softmax(
    exported, tone_run, tone_dataset
):
    import keras

    from kws.data import DataConfig, SpeechData
    from kws.features import mfcc
    from kws.runtime import MODEL_FILE

    out, manifest = exported
    assert manifest["output"]["values"] == runtime.LOGITS
    features = mfcc(SpeechData(DataConfig(**manifest["training"]["data"])).evaluation_set("validation").audio)
    trained = keras.models.load_model(tone_run[0] / MODEL_FILE, compile=False).predict(features, verbose=0)
    for kind in ("float32", "int8"):
        model = runtime.Model.load(out / f"model_{kind}.tflite")
        ops = [op["op_name"] for op in model._interpreter._get_ops_details()]
        assert "SOFTMAX" not in ops, kind
        scores = model.scores(features)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
        if kind == "float32":  # the trained Keras model's softmax, to float rounding
            np.testing.assert_allclose(scores, trained, atol=1e-5)
        else:  # int8 logits: the same decisions, and scores above 255/256, the top of an int8 softmax
            assert (scores.argmax(axis=1) == trained.argmax(axis=1)).mean() > 0.95
            assert (scores.max(axis=1) > 255 / 256).any()


def test_a_manifest_without_output_values_is_an_export_with_the_softmax_inside(exported):
    out, manifest = exported
    tflite = (out / "model_float32.tflite").read_bytes()
    batch = np.random.default_rng(0).normal(size=(4, NUM_FRAMES, NUM_MFCC)).astype(np.float32)
    older = {key: value for key, value in manifest.items() if key != "output"}
    passed_through = runtime.Model(tflite, older).scores(batch)  # this model's logits, as they are
    np.testing.assert_allclose(
        runtime.softmax(passed_through, axis=-1), runtime.Model(tflite, manifest).scores(batch)
    )
    with pytest.raises(runtime.ModelError, match="output.values is 'log_probabilities'"):
        runtime.Model(tflite, {**manifest, "output": {**manifest["output"], "values": "log_probabilities"}})


def test_c_array_holds_the_int8_model_without_the_manifest_a_device_never_reads(exported):
    out, manifest = exported
    source = (out / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char kws_model_data[]" in source
    array = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", source))
    int8 = (out / "model_int8.tflite").read_bytes()
    assert runtime.embedded_manifest(array) is None and runtime.embedded_manifest(int8) is not None
    assert len(int8) - len(array) >= len(json.dumps(runtime.embedded_manifest(int8), separators=(",", ":")))
    assert array == runtime.without_manifest(int8)
    assert f"kws_model_data_len = {len(array)};" in source
    probe = np.random.default_rng(0).uniform(-60, 30, (20, 49, 10)).astype(np.float32)
    device, file = runtime.Model(array, manifest), runtime.Model(int8, manifest)
    assert (device.raw_scores(device.prepare(probe)) == file.raw_scores(file.prepare(probe))).all()
    assert runs_on_tflm(array, manifest["sizes"]["tflm_arena_bytes"])
    from ai_edge_litert.interpreter import Interpreter

    header = (out / "kws_frontend.h").read_text()
    assert f"#define KWS_INPUT_ZERO_POINT {exported[1]['input']['zero_point']}" in header
    scale, _ = Interpreter(model_path=str(out / "model_int8.tflite")).get_input_details()[0]["quantization"]
    written = re.search(r"#define KWS_INPUT_SCALE (\S+)f\n", header).group(1)
    assert np.float32(written) == np.float32(scale)


def test_the_c_array_and_its_arena_size_compile_for_a_device(exported, tmp_path):
    out, manifest = exported
    arena = manifest["sizes"]["tflm_arena_bytes"]
    assert arena and f"#define KWS_ARENA_BYTES {arena}\n" in (out / "model_data.h").read_text()
    assert compile_with(out, tmp_path).returncode == 0
    printed = subprocess.run([str(tmp_path / "main")], capture_output=True, text=True, check=True).stdout
    assert printed == f"{len(runtime.without_manifest((out / 'model_int8.tflite').read_bytes()))} {arena}"


def test_the_arena_size_is_what_tflm_needs(exported):
    out, manifest = exported
    tflite, arena = (out / "model_int8.tflite").read_bytes(), manifest["sizes"]["tflm_arena_bytes"]
    # TFLM allocates in 16-byte steps; 1 KB less is well past any rounding, and about 4 % of the arena.
    assert runs_on_tflm(tflite, arena) and not runs_on_tflm(tflite, arena - 1024)


def test_without_tflite_micro_the_c_header_stops_a_device_build(exported, tmp_path, monkeypatch):
    out, manifest = exported
    tflite = (out / "model_int8.tflite").read_bytes()
    monkeypatch.setitem(sys.modules, "tflite_micro.python.tflite_micro", None)  # as if not installed
    arena = export.tflm_arena_bytes(tflite)
    assert arena is None
    without = {**manifest, "sizes": {**manifest["sizes"], "tflm_arena_bytes": arena}}
    for name, text in zip(("model_data.h", "model_data.cc"), export.c_array(tflite, without), strict=True):
        (tmp_path / name).write_text(text)
    failed = compile_with(tmp_path, tmp_path)
    assert failed.returncode != 0 and "install tflite-micro" in failed.stderr
    assert compile_with(tmp_path, tmp_path, "-DKWS_ARENA_BYTES=30000").returncode == 0


def test_a_model_tflm_cannot_run_fails_the_export_with_tflms_reason(exported):
    out, _ = exported
    with pytest.raises(export.ExportError, match="DEQUANTIZE .* failed to prepare"):
        export.tflm_arena_bytes((out / "model_float16.tflite").read_bytes())  # float16 weights: not for TFLM


def test_tflite_carries_its_manifest_so_it_runs_alone(exported, tmp_path):
    out, manifest = exported
    alone = tmp_path / "copied.tflite"
    shutil.copy(out / "model_int8.tflite", alone)
    model = runtime.Model.load(alone)
    assert model.labels == manifest["labels"]
    assert model.manifest["input"] == manifest["input"]


def test_runtime_scores_match_the_recorded_int8_accuracy(exported, tone_dataset):
    from kws.data import DataConfig, SpeechData
    from kws.features import mfcc

    out, manifest = exported
    model = runtime.Model.load(out)
    validation = SpeechData(DataConfig(**manifest["training"]["data"])).evaluation_set("validation")
    scores = model.scores(mfcc(validation.audio))
    assert scores.shape == (len(validation.labels), 6)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=0.02)
    assert (scores.argmax(axis=1) == validation.labels).mean() == pytest.approx(manifest["accuracy"]["int8"])


def test_eval_of_an_exported_model_never_imports_tensorflow(exported, tone_dataset):
    out, manifest = exported
    script = (
        "import json, sys, io, contextlib\n"
        "from kws.cli import main\n"
        "buffer = io.StringIO()\n"
        "with contextlib.redirect_stdout(buffer):\n"
        f"    code = main(['eval', '--model', {str(out / 'model_int8.tflite')!r}, '--data', "
        f"{str(tone_dataset)!r}, '--split', 'validation', '--json'])\n"
        "print(json.dumps({'code': code, 'tf': [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras')], 'accuracy': json.loads(buffer.getvalue())['accuracy']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["tf"] == []
    assert result["accuracy"] == pytest.approx(manifest["accuracy"]["int8"])


def test_run_folder_exported_in_place_resolves_to_its_export(tone_run, exported, tmp_path):
    run, _ = tone_run
    with pytest.raises(runtime.ModelError, match="kws export"):
        runtime.resolve(run)
    out, _ = exported
    shutil.copytree(out, tmp_path / "run" / "export")
    tflite, manifest = runtime.resolve(tmp_path / "run")
    assert (
        tflite == tmp_path / "run" / "export" / "model_int8.tflite" and manifest["labels"][0] == "_silence_"
    )


def test_quantize_rounds_half_away_from_zero_and_clamps():
    values = np.array([0.5, 1.5, -0.5, -1.5, 0.49, 1000.0, -1000.0], np.float32)
    np.testing.assert_array_equal(runtime.quantize(values, 1.0, 0), [1, 2, -1, -2, 0, 127, -128])
    np.testing.assert_array_equal(runtime.quantize(np.array([2.0]), 0.5, -10), [-6])
    # back again, from the zero point: a softmax output runs from -128 (0) to 127 (255/256)
    np.testing.assert_array_equal(
        runtime.dequantize(np.array([-128, 0, 127], np.int8), 1 / 256, -128), [0, 0.5, 255 / 256]
    )


def test_export_calibrates_thresholds_and_records_the_stream_test(exported):
    out, manifest = exported
    detection, streaming = manifest["detection"], manifest["streaming"]
    keywords = ["yes", "no", "up", "down"]
    assert set(detection["thresholds"]) == set(keywords)
    assert all(0.3 <= detection["thresholds"][k] < 1 for k in keywords)
    assert streaming["target_fa_per_hour"] == 0.5 and streaming["keywords"] > 0
    assert set(streaming["per_keyword"]) == set(keywords)
    assert [streaming["per_keyword"][k]["threshold"] for k in keywords] == [
        detection["thresholds"][k] for k in keywords
    ]
    assert (out / "det_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert runtime.embedded_manifest((out / "model_int8.tflite").read_bytes())["detection"] == detection


def test_calibrate_rewrites_thresholds_everywhere(exported, tmp_path, capsys):
    from kws.cli import main

    out, manifest = exported
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    assert main(["calibrate", str(copy), "--target-fa", "1000", "--hop-ms", "20"]) == 0
    assert "recall" in capsys.readouterr().out
    updated = json.loads((copy / "manifest.json").read_text())
    assert updated["detection"]["hop_frames"] == 1 and updated["streaming"]["target_fa_per_hour"] == 1000
    # a lax target allows lower thresholds than the strict default
    for keyword, threshold in updated["detection"]["thresholds"].items():
        assert threshold <= manifest["detection"]["thresholds"][keyword]
    tflite = (copy / "model_int8.tflite").read_bytes()
    embedded = runtime.embedded_manifest(tflite)
    assert embedded["detection"] == updated["detection"]
    # all but the file sizes, which would go stale
    assert embedded["sizes"] == {
        key: updated["sizes"][key] for key in ("parameters", "macs", "tflm_arena_bytes")
    }
    assert updated["sizes"]["int8_bytes"] == len(tflite)
    assert (copy / "model_data.cc").read_text() == export.c_array(tflite, updated)[1]  # the new thresholds
    assert "#define KWS_HOP_FRAMES 1 " in (copy / "model_data.h").read_text()


def test_calibrate_a_tflite_without_its_manifest_keeps_the_arena(exported, tmp_path):
    from kws.cli import main

    out, manifest = exported
    arena = manifest["sizes"]["tflm_arena_bytes"]
    fresh, older = tmp_path / "fresh", tmp_path / "older"
    for copy in (fresh, older):
        shutil.copytree(out, copy)
        (copy / "manifest.json").unlink()
    for name in export.MODEL_FILES.values():  # exports that left the arena out of the .tflite
        tflite = (older / name).read_bytes()
        embedded = runtime.embedded_manifest(tflite)
        del embedded["sizes"]["tflm_arena_bytes"]
        (older / name).write_bytes(runtime.embed_manifest(tflite, embedded))
    for copy in (fresh, older):
        assert main(["calibrate", str(copy / "model_int8.tflite"), "--target-fa", "1000"]) == 0
        assert json.loads((copy / "manifest.json").read_text())["sizes"]["tflm_arena_bytes"] == arena
        assert f"#define KWS_ARENA_BYTES {arena}\n" in (copy / "model_data.h").read_text()
        assert f"TFLM tensor arena {arena} bytes" in (copy / "MODEL_CARD.md").read_text()


def test_calibrating_a_float_model_file_calibrates_the_int8_model_as_a_device_runs_it(
    exported, tmp_path, monkeypatch
):
    from kws.cli import main
    from kws.runtime import Model

    out, manifest = exported
    shutil.copytree(out, tmp_path / "export")
    real_stream_test, calibrated_on = export.stream_test, []
    probe = np.random.default_rng(0).uniform(-60, 30, (50, 49, 10)).astype(np.float32)

    def stream_test(model, *args):
        calibrated_on.append((model.quantized, model.raw_scores(model.prepare(probe))))
        return real_stream_test(model, *args)

    monkeypatch.setattr(export, "stream_test", stream_test)
    assert main(["calibrate", str(tmp_path / "export" / "model_float32.tflite"), "--target-fa", "1000"]) == 0
    ((quantized, scores),) = calibrated_on
    assert quantized
    # Scored as TFLite Micro rounds (the reference kernels), not as LiteRT's XNNPACK does.
    reference, default = (Model(out / "model_int8.tflite", manifest, kernels) for kernels in (True, False))
    assert (scores == reference.raw_scores(reference.prepare(probe))).all()
    assert (scores != default.raw_scores(default.prepare(probe))).any()


def broken_model_card(monkeypatch):
    def broken_card(manifest):
        raise RuntimeError("no card")

    monkeypatch.setattr(export, "model_card", broken_card)
    return RuntimeError, "no card"


def disk_full_at_the_model_card(monkeypatch):
    write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):  # the model card is written after the models
        if path.name.endswith(export.MODEL_CARD):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    return OSError, "No space left"


def interrupted_drawing_the_det_curve(monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C during the last step: the DET curve

    monkeypatch.setattr(export.plots, "det_curve", interrupted)
    return KeyboardInterrupt, None


@pytest.mark.parametrize(
    "fault", [broken_model_card, disk_full_at_the_model_card, interrupted_drawing_the_det_curve]
)
def test_a_calibration_that_fails_leaves_the_export_as_it_was(fault, exported, tmp_path, monkeypatch):
    from kws.data import DataConfig, SpeechData
    from kws.stream import DetectionConfig

    out, manifest = exported
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    before = files_of(copy)
    error, message = fault(monkeypatch)
    data = SpeechData(DataConfig(**manifest["training"]["data"]))
    with pytest.raises(error, match=message):
        export.recalibrate(copy, data, DetectionConfig(), 1000)
    assert files_of(copy) == before


def test_ctrl_c_while_an_export_is_renamed_into_place_waits_for_the_whole_set(tmp_path, monkeypatch):
    from kws import files

    for name in "abcd":
        (tmp_path / name).write_text("old")
    replace, renamed = os.replace, []

    def interrupted(source, target):
        renamed.append(target)
        if len(renamed) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between two renames
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        files.write_files(tmp_path, dict.fromkeys("abcd", "new"))
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == dict.fromkeys("abcd", "new")
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    # Where Ctrl-C is ignored (a background job), it stays ignored: the set is written, no error.
    renamed.clear()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        files.write_files(tmp_path, dict.fromkeys("abcd", "newer"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == dict.fromkeys("abcd", "newer")


def test_sigterm_while_an_export_is_renamed_into_place_waits_for_the_whole_set(tmp_path, monkeypatch):
    from kws import Stopped, files, stopped_by_signals

    replace, renamed = os.replace, []

    def terminated(source, target):
        renamed.append(target)
        if len(renamed) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # docker stop between two renames
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", terminated)
    with stopped_by_signals(), pytest.raises(Stopped):  # as every command but serve runs
        files.write_files(tmp_path, dict.fromkeys("abcd", "new"))
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == dict.fromkeys("abcd", "new")
    # Under nohup, a SIGHUP that comes first stays ignored, and the SIGTERM after it still stops.
    renamed.clear()

    def hung_up_then_terminated(source, target):
        renamed.append(target)
        if len(renamed) in (1, 2):
            os.kill(os.getpid(), signal.SIGHUP if len(renamed) == 1 else signal.SIGTERM)
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", hung_up_then_terminated)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stopped_by_signals(), pytest.raises(Stopped) as stopped:
            files.write_files(tmp_path, dict.fromkeys("abcd", "newer"))
        assert stopped.value.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_stream_test_on_data_without_validation_clips_says_so(exported, tmp_path, capsys):
    from kws.cli import main

    package = tmp_path / "package"  # the test set package's layout: every clip a test clip
    for word in ("_unknown_", "yes"):
        (package / word).mkdir(parents=True)
        sf.write(package / word / "a_nohash_0.wav", tone(440.0), 16000)
    assert main(["eval", "--stream", "--model", str(exported[0]), "--data", str(package)]) == 2
    err = capsys.readouterr().err
    assert f"nothing to build a test stream from: the validation split of {package} holds no clips" in err
    assert "Traceback" not in err


def test_calibrate_to_no_false_accepts_at_all(exported, tmp_path, capsys):
    from kws.cli import main

    out, manifest = exported
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    assert main(["calibrate", str(copy), "--target-fa", "-0"]) == 0
    streaming = json.loads((copy / "manifest.json").read_text())["streaming"]
    assert streaming["target_fa_per_hour"] == 0 and streaming["false_accepts"] == 0
    assert "calibrated to 0.0 false accepts per hour" in (copy / "MODEL_CARD.md").read_text()  # not -0.0
    for keyword, row in streaming["per_keyword"].items():
        assert row["threshold"] >= manifest["detection"]["thresholds"][keyword]  # stricter than 0.5 / h
    for bad, reason in [
        (["--target-fa", "-1"], "0 or more"),
        (["--hop-ms", "30"], "multiple of the 20 ms"),
        (["--average-ms", "0"], "milliseconds above 0, at most 1000"),
    ]:
        with pytest.raises(SystemExit):
            main(["calibrate", str(copy), *bad])
        assert reason in capsys.readouterr().err


def test_a_keyword_the_stream_never_says_keeps_its_threshold(exported, tone_dataset, tmp_path, capsys):
    from kws.cli import main

    out, manifest = exported
    copy, data = tmp_path / "export", tmp_path / "data"
    shutil.copytree(out, copy)
    shutil.copytree(tone_dataset, data)
    shutil.rmtree(data / "down")
    assert main(["calibrate", str(copy), "--data", str(data), "--target-fa", "1000"]) == 0
    kept = manifest["detection"]["thresholds"]["down"]
    assert (
        f"the test stream never says down: recall not measured, thresholds kept as they were (down {kept:g})"
        in (capsys.readouterr().err)
    )
    thresholds = json.loads((copy / "manifest.json").read_text())["detection"]["thresholds"]
    assert thresholds["down"] == kept
    assert all(thresholds[k] <= manifest["detection"]["thresholds"][k] for k in ("yes", "no", "up"))


def test_a_keyword_the_calibrated_thresholds_never_find_is_named(exported, tone_dataset, tmp_path, capsys):
    from kws.cli import main

    out, _ = exported
    copy, data = tmp_path / "export", tmp_path / "data"
    shutil.copytree(out, copy)
    shutil.copytree(tone_dataset, data)
    for clip in (data / "down").iterdir():  # every "down" sounds like "up": never found
        sf.write(clip, tone(WORD_TONES["up"], seed=int(clip.stem[:2])), 16000)
    assert main(["calibrate", str(copy), "--data", str(data), "--target-fa", "1000"]) == 0
    captured = capsys.readouterr()
    assert "The thresholds are unchanged" not in captured.out  # 1000 per hour moved them
    warnings = [line for line in captured.err.splitlines() if "never fire" in line]
    assert len(warnings) == 1 and "none of the" in warnings[0] and "'down'" in warnings[0]
    assert json.loads((copy / "manifest.json").read_text())["streaming"]["per_keyword"]["down"]["recall"] == 0


def test_calibration_warnings_are_kept_in_the_manifest_and_the_model_card(exported, tmp_path, capsys):
    from kws.cli import main

    copy = shutil.copytree(exported[0], tmp_path / "export")
    assert main(["calibrate", str(copy), "--target-fa", "0.5"]) == 0  # the tone stream lasts minutes
    # As the export calibrated it: the same thresholds, and it says why rather than seem to do nothing.
    assert (
        "The thresholds are unchanged: 0.5 per hour allows 0 false accepts on this" in capsys.readouterr().out
    )
    manifest = json.loads((copy / "manifest.json").read_text())
    (warning,) = [w for w in manifest["streaming"]["warnings"] if w.startswith("the test stream lasts")]
    assert f"- Calibration warned: {warning}" in (copy / "MODEL_CARD.md").read_text()


def test_model_card_states_the_measured_figures(exported):
    out, manifest = exported
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# {manifest['name']}: keyword spotter for yes, no, up, down")
    assert f"int8 {manifest['accuracy']['int8']:.2%}" in card
    assert f"{manifest['sizes']['int8_bytes']:,} bytes" in card
    assert f"recall {manifest['streaming']['recall']:.1%}" in card
    assert f"Recipe: 6 epochs (best: epoch {manifest['training']['best_epoch']})," in card


def test_model_card_keeps_training_warnings_and_says_which_clips_came_from_extra_folders(exported):
    out, manifest = exported
    warnings = manifest["training"]["warnings"]
    assert warnings and any(w.startswith("few validation clips") for w in warnings)  # the tone data's
    card = (out / "MODEL_CARD.md").read_text()
    assert all(f"- Training warned: {warning}" in card for warning in warnings)
    training = {
        **manifest["training"],
        "extra_clips": {"/data/synth": {"yes": 100, "no": 90, "bed": 2, "cat": 3}},
    }
    card = export.model_card({**manifest, "training": training})
    assert (
        "- Of them, from /data/synth (training only, never validated on): yes 100, no 90, up 0, down 0; "
        "and 5 clips of other words"
    ) in card


def test_model_card_says_silence_was_learned_only_from_noise_that_was_read(exported):
    _, manifest = exported
    assert manifest["training"]["noise_files"] == ["hum.wav", "white_noise.wav"]  # the tone data's
    silence = "- `_silence_`: 10% of examples, background noise from near silence to full level\n"
    assert silence in export.model_card(manifest)
    for recorded, said in (([], False), (None, True)):  # None: a manifest from before it was recorded
        training = {**manifest["training"], "noise_files": recorded}
        card = export.model_card({**manifest, "training": training})
        assert (silence in card) is said
        assert (
            "- `_silence_`: none: no background noise was found, so the model never heard silence" in card
        ) != said


def test_model_card_of_a_manifest_without_model_counts_says_unknown(exported):
    _, manifest = exported
    card = export.model_card({**manifest, "sizes": {**manifest["sizes"], "parameters": None, "macs": None}})
    assert "(unknown parameters, unknown multiply-accumulates per inference)" in card


def test_export_of_an_unfinished_run_says_so_and_counts_the_model_itself(tone_run, tmp_path, capsys):
    from kws.runtime import CONFIG_FILE
    from kws.train import METRICS_FILE

    run, metrics = tone_run
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run, interrupted, ignore=shutil.ignore_patterns(METRICS_FILE))
    config = json.loads((interrupted / CONFIG_FILE).read_text())
    config["train"]["epochs"] = 10  # stopped after 6 of 10
    (interrupted / CONFIG_FILE).write_text(json.dumps(config))
    manifest = export.export(interrupted, tmp_path / "out")
    best = metrics["best_epoch"]
    assert "has trained 6 of its 10 epochs" in capsys.readouterr().err
    assert (manifest["training"]["epochs_trained"], manifest["training"]["best_epoch"]) == (6, best)
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert f"Recipe: 6 of 10 planned epochs (best: epoch {best})" in card
    assert (
        manifest["sizes"]["parameters"] == metrics["parameters"]
        and manifest["sizes"]["macs"] == metrics["macs"]
    )
    assert (
        f"({metrics['parameters']:,} parameters, {metrics['macs'] / 1e6:.2f} M multiply-accumulates" in card
    )


def test_a_run_trained_on_after_its_export_is_flagged(tone_run, tone_export, tmp_path, capsys):
    from kws.runtime import EXPORT_FOLDER, MANIFEST_FILE, MODEL_FILE

    run = tmp_path / "run"
    shutil.copytree(tone_run[0], run)
    shutil.copytree(tone_export[0], run / EXPORT_FOLDER)
    assert tone_export[1]["training"]["model_sha256"] == runtime.model_digest((run / MODEL_FILE).read_bytes())
    later = (run / EXPORT_FOLDER / MANIFEST_FILE).stat().st_mtime + 60
    os.utime(run / MODEL_FILE, (later, later))  # newer than the export, as a copy can make it
    runtime.resolve(run)
    assert capsys.readouterr().err == ""  # the same model: the digest says so, whatever the times
    (run / MODEL_FILE).write_bytes(b"a better model, saved after the export")
    assert runtime.resolve(run)[0] == run / EXPORT_FOLDER / "model_int8.tflite"  # still what runs
    assert f"run `kws export {run}` to use the newer model" in capsys.readouterr().err
    runtime.resolve(run / EXPORT_FOLDER)  # the export folder, as the README names it
    assert f"run `kws export {run}` to use the newer model" in capsys.readouterr().err
    runtime.resolve(
        shutil.copytree(run / EXPORT_FOLDER, tmp_path / EXPORT_FOLDER)
    )  # not in a run: no warning
    assert capsys.readouterr().err == ""
    # An export from before the digest was recorded: the file times decide.
    manifest = json.loads((run / EXPORT_FOLDER / MANIFEST_FILE).read_text())
    manifest["training"] = None
    (run / EXPORT_FOLDER / MANIFEST_FILE).write_text(json.dumps(manifest))
    os.utime(run / MODEL_FILE, (1, 1))
    runtime.resolve(run)
    assert capsys.readouterr().err == ""
    (run / MODEL_FILE).touch()
    runtime.resolve(run)
    assert "to use the newer model" in capsys.readouterr().err


def test_calibrating_a_run_resolves_it_once(tone_run, tone_export, tmp_path, monkeypatch, capsys):
    from kws.cli import main
    from kws.runtime import EXPORT_FOLDER, MODEL_FILE

    run = tmp_path / "run"
    shutil.copytree(tone_run[0], run)
    shutil.copytree(tone_export[0], run / EXPORT_FOLDER)
    (run / MODEL_FILE).write_bytes(b"a better model, saved after the export")
    given = []
    monkeypatch.setattr("kws.export.recalibrate", lambda model, *rest: given.append(model) or tone_export[1])
    assert main(["calibrate", str(run)]) == 0
    assert given == [run / EXPORT_FOLDER / "model_int8.tflite"]
    assert capsys.readouterr().err.count("warning:") == 1


def test_export_says_which_config_key_names_missing_data(tone_run, tmp_path):
    from kws.runtime import CONFIG_FILE, MODEL_FILE

    run, _ = tone_run
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run / MODEL_FILE, moved)
    config = json.loads((run / CONFIG_FILE).read_text())
    config["data"]["data_dir"] = str(tmp_path / "gone")
    (moved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError) as error:
        export.export(moved, tmp_path / "out")
    assert f'data_dir under "data" in {moved / CONFIG_FILE}' in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_or_mismatched_model_keras_is_named_before_any_conversion(
    tone_run, tmp_path, monkeypatch, capsys
):
    from kws.cli import main
    from kws.runtime import CONFIG_FILE, MODEL_FILE, ModelError

    converted = []
    monkeypatch.setattr(export, "convert", lambda *args: converted.append(args))
    run = shutil.copytree(tone_run[0], tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())
    whole = (run / MODEL_FILE).read_bytes()
    (run / MODEL_FILE).write_bytes(whole[: len(whole) // 2])  # a copy that stopped halfway
    with pytest.raises(ModelError) as error:
        export.export(run, tmp_path / "out")
    assert str(error.value).startswith(f"{run / MODEL_FILE} is not a readable Keras model (")
    assert str(error.value).endswith(f"(`kws train --resume {run}` goes on from its last checkpoint)")
    # kws eval scores a run folder through the same loading
    assert main(["eval", "--model", str(run), "--data", config["data"]["data_dir"]]) == 2
    assert capsys.readouterr().err == f"kws eval: error: {error.value}\n"
    (run / MODEL_FILE).write_bytes(whole)
    config["data"]["words"] = config["data"]["words"][:-1]  # another run's config: one label fewer
    (run / CONFIG_FILE).write_text(json.dumps(config))
    pattern = r"outputs (\d+) scores but .* lists (\d+) labels \(.*\): the model is another run's"
    with pytest.raises(ModelError, match=pattern) as error:
        export.export(run, tmp_path / "out")
    outputs, listed = map(int, re.search(pattern, str(error.value)).groups())
    assert outputs == listed + 1
    assert converted == [] and not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_state_is_skipped_with_a_warning(tone_run, tmp_path, capsys):
    from kws.train import latest_checkpoint

    run = shutil.copytree(tone_run[0], tmp_path / "run")
    model_file, state = latest_checkpoint(run)
    model_file.with_suffix(".json").write_text('{"epochs_do')  # as a full disk can leave it
    progress = export.training_progress(run, export.checked_run(run))
    assert progress["epochs_trained"] == state["epochs_done"] - 1  # the checkpoint before it
    assert (
        f"warning: skipping the damaged checkpoint {model_file.with_suffix('.json')}"
        in capsys.readouterr().err
    )


def test_a_manifest_of_another_model_fails_at_load_naming_both_counts(exported, tmp_path):
    out, manifest = exported
    shutil.copy(out / "model_int8.tflite", tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "labels": manifest["labels"][:-1]}))
    tflite = tmp_path / "model_int8.tflite"
    with pytest.raises(
        runtime.ModelError, match=f"{re.escape(str(tflite))} outputs 6 scores but its manifest lists 5"
    ):
        runtime.Model(tflite, json.loads((tmp_path / "manifest.json").read_text()))


def test_a_tflite_beside_another_models_manifest_is_refused_not_read_with_its_labels(exported, tmp_path):
    out, manifest = exported
    tflite = Path(shutil.copy(out / "model_int8.tflite", tmp_path))
    renamed = [label.upper() for label in manifest["labels"]]  # same count: only the names tell
    other = {**manifest, "name": "other", "labels": renamed}
    (tmp_path / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(runtime.ModelError) as refused:
        runtime.Model.load(tflite)
    assert str(refused.value).startswith(
        f"{tflite} is another model than {tmp_path / 'manifest.json'} beside it describes (name "
        f"{manifest['name']!r} inside it, 'other' beside it; labels {manifest['labels']!r} inside it, "
        f"{renamed!r} beside it): keep each"
    )
    with pytest.raises(runtime.ModelError, match=f"{re.escape(str(tflite))} is another model"):
        runtime.Model.load(tmp_path)  # the folder's manifest names it: the same mix
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "detection": other["detection"]}))
    assert runtime.Model.load(tflite).labels == manifest["labels"]  # its own, perhaps recalibrated


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"hop_frames": 0}, "hop_frames must be a whole number of at least 1, got 0"),
        ({"average_ms": -1}, "average_ms must be a number of milliseconds, got -1"),
        (
            {"hop_frames": 51},
            "hop_frames must keep the hop within the model's 1000 ms window (at most 50), got 51",
        ),
        ({"average_ms": 1500}, "average_ms must be at most the model's 1000 ms window, got 1500"),
        (
            {"thresholds": {"yes": "high"}},
            "the threshold of yes must be a number, 0 or more (above 1: never), got 'high'",
        ),
        ({"window_ms": 500}, "unexpected keyword argument 'window_ms'"),
        ({"thresholds": {"yess": 0.5}}, "thresholds for yess, which are not keywords of this model ("),
    ],
)
def test_a_manifest_with_unusable_detection_settings_fails_at_load(exported, tmp_path, change, problem):
    out, manifest = exported
    shutil.copy(out / "model_int8.tflite", tmp_path)
    detection = {**manifest["detection"], **change}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "detection": detection}))
    with pytest.raises(runtime.ModelError, match="detection settings are unusable") as raised:
        runtime.Model.load(tmp_path / "model_int8.tflite")
    assert problem in str(raised.value) and str(raised.value).endswith(runtime.EXPORT_AGAIN)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"output": None}, "output is None, not an object"),
        ({"frontend": None}, "frontend is None, not an object"),
        ({"detection": []}, "detection is [], not an object"),
        ({"labels": list(range(6))}, "labels are [0, 1, 2, 3, 4, 5], not a list of names"),
        ({"labels": "yes,no"}, "labels are 'yes,no', not a list of names"),
    ],
)
def test_a_manifest_edited_into_the_wrong_shape_is_named_not_a_traceback(exported, change, problem):
    out, manifest = exported
    with pytest.raises(runtime.ModelError) as raised:
        runtime.Model(out / "model_int8.tflite", {**manifest, **change})
    assert (
        str(raised.value) == f"{out / 'model_int8.tflite'}: its manifest's {problem}: {runtime.EXPORT_AGAIN}"
    )


def test_a_model_path_that_does_not_exist_says_so(tmp_path):
    for missing in ("nowhere", "gone.tflite"):
        with pytest.raises(runtime.ModelError, match=f"{missing} does not exist"):
            runtime.resolve(tmp_path / missing)


def test_a_runs_keras_file_as_model_is_told_to_pass_the_run_folder(tone_run):
    run, _ = tone_run
    with pytest.raises(runtime.ModelError) as error:
        runtime.resolve(run / runtime.MODEL_FILE)
    assert str(error.value) == (
        f"model {run / runtime.MODEL_FILE} is a run's Keras model: export the run with `kws export {run}` "
        f"and pass {run / 'export'} (kws eval also scores the run folder itself)"
    )


def test_an_export_missing_its_int8_model_says_which_file(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    (copy / "model_int8.tflite").unlink()
    with pytest.raises(runtime.ModelError) as error:
        runtime.resolve(copy)
    named = f"{copy / 'model_int8.tflite'}, which {copy / 'manifest.json'} names"
    assert str(error.value) == f"{named}, is missing: {runtime.EXPORT_AGAIN}"


def test_a_folder_without_a_model_is_told_to_export_only_if_it_is_a_run(tmp_path):
    with pytest.raises(runtime.ModelError) as raised:
        runtime.resolve(tmp_path)
    assert str(raised.value) == f"{tmp_path} holds no manifest.json: pass a folder made by `kws export`"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(runtime.ModelError, match=f"or export this run first with `kws export {tmp_path}`"):
        runtime.resolve(tmp_path)
