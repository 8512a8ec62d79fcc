"""The generated C frontend: compiled with the machine's compiler, it must match kws.features."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import readme_code

from kws import audio, stream
from kws import features as F
from kws.c_frontend import c_frontend_sources, scale_bits
from kws.export import c_array
from kws.files import write_files
from kws.runtime import Model, resolve
from kws.stream import DetectionConfig, Detector, EventRules, detection_config

SCALE = 0.55  # MFCC c0 spans about -87..+45: a realistic int8 input quantization
ZERO_POINT = 30
# Max |C - Python| as a share of the MFCC value range: measured 1.3e-6 on the synthetic signals
# (1.5e-4 absolute, on a loud sweep) and 3e-7 on real clips; the rest is headroom for other compilers.
FLOAT_TOLERANCE = 1e-5
WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go")
CLIPS_PER_WORD = 15

HARNESS = r"""
#include <stdio.h>
#include "kws_frontend.h"

/* Frames of KWS_WINDOW_SAMPLES native int16 in; int8 and float32 MFCC rows out. */
int main(int argc, char **argv)
{
    if (argc != 4) {
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    FILE *quantized = fopen(argv[2], "wb");
    FILE *unquantized = fopen(argv[3], "wb");
    if (!in || !quantized || !unquantized) {
        return 1;
    }
    int16_t frame[KWS_WINDOW_SAMPLES];
    int8_t q[KWS_NUM_MFCC];
    float f[KWS_NUM_MFCC];
    while (fread(frame, sizeof frame, 1, in) == 1) {
        kws_frontend_frame(frame, q);
        kws_frontend_frame_float(frame, f);
        fwrite(q, sizeof q, 1, quantized);
        fwrite(f, sizeof f, 1, unquantized);
    }
    return fclose(in) | fclose(quantized) | fclose(unquantized);
}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The generated sources and a harness binary built from them with strict warnings."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    out = tmp_path_factory.mktemp("c_frontend")
    write_files(out, c_frontend_sources(SCALE, ZERO_POINT))
    header, source = out / "kws_frontend.h", out / "kws_frontend.c"
    (out / "main.c").write_text(HARNESS)
    binary = out / "frontend"
    # -Wdouble-promotion: a Cortex-M4F has single-precision hardware only, so no double may sneak in.
    flags = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-Wdouble-promotion"]
    result = subprocess.run(
        [compiler, *flags, "-I", str(out), str(out / "main.c"), str(source), "-o", str(binary), "-lm"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return {"header": header, "source": source, "binary": binary}


def run_c(build, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, WINDOW_SAMPLES) int16 frames -> the C frontend's (n, NUM_MFCC) int8 and float32 outputs."""
    folder = build["binary"].parent
    paths = [folder / "frames.raw", folder / "int8.raw", folder / "float.raw"]
    np.ascontiguousarray(frames, dtype=np.int16).tofile(paths[0])
    subprocess.run([str(build["binary"]), *map(str, paths)], check=True)
    quantized = np.fromfile(paths[1], dtype=np.int8).reshape(-1, F.NUM_MFCC)
    unquantized = np.fromfile(paths[2], dtype=np.float32).reshape(-1, F.NUM_MFCC)
    assert len(quantized) == len(unquantized) == len(frames)
    return quantized, unquantized


def to_int16(samples: np.ndarray) -> np.ndarray:
    """What a device's 16-bit ADC or codec hands over for float samples in [-1, 1)."""
    return np.clip(np.round(np.asarray(samples, np.float64) * 32768), -32768, 32767).astype(np.int16)


def frames_of(clip: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(clip, F.WINDOW_SAMPLES)
    return windows[:: F.HOP_SAMPLES][: F.num_frames(len(clip))]


def assert_matches_python(build, frames: np.ndarray) -> None:
    quantized, unquantized = run_c(build, frames)
    expected = F.frame_features(frames.astype(np.float32) / 32768)
    value_range = float(expected.max() - expected.min())
    float_error = float(np.abs(unquantized - expected).max())
    assert float_error <= FLOAT_TOLERANCE * value_range, (float_error, value_range)

    expected_q = np.clip(np.round(expected / SCALE) + ZERO_POINT, -128, 127).astype(np.int64)
    steps = np.abs(quantized.astype(np.int64) - expected_q)
    assert steps.max() <= 1, f"{int(steps.max())} steps apart"
    assert (steps == 0).mean() >= 0.99, f"only {(steps == 0).mean():.4f} identical"


def synthetic_clips() -> dict[str, np.ndarray]:
    t = np.arange(F.CLIP_SAMPLES) / F.SAMPLE_RATE
    sweep_phase = 2 * np.pi * (20 * t + (7980 / 2) * t**2)  # 20 Hz -> 8 kHz over the second
    clips = {f"sweep {level}": level * np.sin(sweep_phase) for level in (0.001, 0.5, 0.99)}
    for seed, level in enumerate((1e-4, 1e-3, 1e-2, 0.1, 1.0)):
        clips[f"noise {level}"] = np.random.default_rng(seed).uniform(-level, level, F.CLIP_SAMPLES)
    clips["silence"] = np.zeros(F.CLIP_SAMPLES)
    clips["clipped sine 440 Hz"] = np.clip(3 * np.sin(2 * np.pi * 440 * t), -1, 1)
    clips["full-scale square 1 kHz"] = np.where(np.sin(2 * np.pi * 1000 * t) >= 0, 1.0, -1.0)
    return {name: to_int16(clip) for name, clip in clips.items()}


def test_synthetic_signals_match_python(build):
    clips = synthetic_clips()
    frames = np.concatenate([frames_of(clip) for clip in clips.values()])
    assert frames.shape == (len(clips) * F.NUM_FRAMES, F.WINDOW_SAMPLES)
    assert frames.min() == -32768 and frames.max() == 32767, "the set must reach both int16 limits"
    assert_matches_python(build, frames)


def test_silence_sits_on_the_log_floor_and_clamps(build):
    quantized, unquantized = run_c(build, np.zeros((1, F.WINDOW_SAMPLES), np.int16))
    assert unquantized[0, 0] == pytest.approx(np.log(F.LOG_FLOOR) * np.sqrt(F.NUM_MEL_BANDS), rel=1e-5)
    np.testing.assert_allclose(unquantized[0, 1:], 0, atol=1e-4)
    assert quantized[0, 0] == -128  # -87.4 / 0.55 + 30 lies below the int8 range
    np.testing.assert_array_equal(quantized[0, 1:], ZERO_POINT)


@pytest.mark.integration
def test_real_clips_match_python(build, shared_data):
    root = shared_data / "speech_commands"
    paths = [
        path
        for word in WORDS
        for path in sorted(path for path in (root / word).iterdir() if audio.is_audio_file(path))[
            :CLIPS_PER_WORD
        ]
    ]
    assert len(paths) >= 100
    clips = [to_int16(audio.fix_length(audio.load(path))) for path in paths]
    frames = np.concatenate([frames_of(clip) for clip in clips])
    assert frames.shape == (len(paths) * F.NUM_FRAMES, F.WINDOW_SAMPLES)
    assert_matches_python(build, frames)


def test_header_constants_equal_kws_features(build):
    header = build["header"].read_text()
    defines = dict(re.findall(r"^#define (KWS_\w+) (\S+)$", header, re.MULTILINE))
    assert {name: int(defines[name]) for name in defines if name != "KWS_INPUT_SCALE"} == {
        "KWS_SAMPLE_RATE": F.SAMPLE_RATE,
        "KWS_WINDOW_SAMPLES": F.WINDOW_SAMPLES,
        "KWS_HOP_SAMPLES": F.HOP_SAMPLES,
        "KWS_NUM_MFCC": F.NUM_MFCC,
        "KWS_NUM_FRAMES": F.NUM_FRAMES,
        "KWS_INPUT_ZERO_POINT": ZERO_POINT,
    }
    assert np.float32(defines["KWS_INPUT_SCALE"].removesuffix("f")) == np.float32(SCALE)
    assert "#include <stdint.h>" in header and "#ifndef KWS_FRONTEND_H" in header


def c_table(source: str, name: str) -> np.ndarray:
    body = re.search(rf"\b{name}\[[^=]*= \{{(.*?)\n\}};", source, re.DOTALL).group(1)
    return np.array([float(item.rstrip("f")) for item in re.findall(r"[-+0-9.e]+f?", body)], np.float32)


def test_source_is_plain_c_with_kws_features_tables(build):
    source = build["source"].read_text()
    assert "malloc" not in source
    assert set(re.findall(r"#include (\S+)", source)) == {
        '"kws_frontend.h"',
        "<math.h>",
        "<stdint.h>",
        "<string.h>",
    }
    np.testing.assert_array_equal(c_table(source, "WINDOW"), F.WINDOW)
    np.testing.assert_array_equal(c_table(source, "DCT_MATRIX").reshape(F.DCT_MATRIX.shape), F.DCT_MATRIX)

    first_bins = c_table(source, "MEL_FIRST_BIN").astype(int)
    counts = c_table(source, "MEL_BIN_COUNT").astype(int)
    weights = c_table(source, "MEL_WEIGHTS")
    assert len(weights) == counts.sum() < F.MEL_MATRIX.size / 10, "the filterbank must be stored sparsely"
    dense = np.zeros_like(F.MEL_MATRIX)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for band, (first, count) in enumerate(zip(first_bins, counts, strict=True)):
        dense[first : first + count, band] = weights[offsets[band] : offsets[band + 1]]
    np.testing.assert_array_equal(dense, F.MEL_MATRIX)


# The README's microcontroller sketch, built against a stand-in for TFLM: the stand-in's
# Invoke() records the model input (pass 1), LiteRT runs the int8 model on those inputs,
# and the stand-in hands back its outputs (pass 2). Like TFLM, it reuses the input tensor's
# memory during Invoke().

TFLM_STANDIN = r"""
#pragma once
#include <stddef.h>
#include <stdint.h>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
struct TfLiteQuantizationParams { float scale; int32_t zero_point; };
union TfLitePtrUnion { int8_t *int8; };
struct TfLiteTensor { TfLitePtrUnion data; TfLiteQuantizationParams params; };
namespace tflite {
struct Model {};
inline const Model *GetModel(const void *) { static Model model; return &model; }
class MicroOpResolver {};
template <unsigned N> class MicroMutableOpResolver : public MicroOpResolver {
 public:
  TfLiteStatus AddConv2D() { return kTfLiteOk; }
  TfLiteStatus AddDepthwiseConv2D() { return kTfLiteOk; }
  TfLiteStatus AddReshape() { return kTfLiteOk; }
  TfLiteStatus AddMean() { return kTfLiteOk; }
  TfLiteStatus AddFullyConnected() { return kTfLiteOk; }
};
class MicroInterpreter {
 public:
  MicroInterpreter(const Model *, const MicroOpResolver &, uint8_t *, size_t) {}
  TfLiteStatus AllocateTensors() { return kTfLiteOk; }
  TfLiteStatus Invoke();
  TfLiteTensor *input(size_t);
  TfLiteTensor *output(size_t);
};
}
"""

SKETCH_HARNESS = r"""
#include <stdio.h>
#include <string.h>
#include "tensorflow/lite/micro/micro_interpreter.h"

static int8_t input_data[49 * 10], output_data[64];
static TfLiteTensor input_tensor = {{input_data}, {0.0f, 0}};
static TfLiteTensor output_tensor = {{output_data}, {OUTPUT_SCALE, OUTPUT_ZERO_POINT}};
static FILE *inputs, *outputs;

TfLiteStatus tflite::MicroInterpreter::Invoke() {
  if (inputs) fwrite(input_data, sizeof input_data, 1, inputs);
  if (outputs && fread(output_data, NUM_OUTPUTS, 1, outputs) != 1) return kTfLiteError;
  memset(input_data, 0x5a, sizeof input_data);
  return kTfLiteOk;
}
TfLiteTensor *tflite::MicroInterpreter::input(size_t) { return &input_tensor; }
TfLiteTensor *tflite::MicroInterpreter::output(size_t) { return &output_tensor; }

#include "sketch.cc"

/* audio.raw (int16) record|replay FILE: prints the hop count of each event and its label. */
int main(int argc, char **argv) {
  if (argc != 4) return 2;
  FILE *audio = fopen(argv[1], "rb");
  if (strcmp(argv[2], "record") == 0) inputs = fopen(argv[3], "wb");
  else outputs = fopen(argv[3], "rb");
  if (!audio || !(inputs || outputs) || !kws_setup()) return 1;
  const int kept = KWS_WINDOW_SAMPLES - KWS_HOP_SAMPLES;
  int16_t window[KWS_WINDOW_SAMPLES];
  if (fread(window, sizeof window, 1, audio) != 1) return 1;
  long hops = 0;
  do {
    int label = kws_hop(window);
    if (++hops, label >= 0) printf("%ld %d\n", hops, label);
    memmove(window, window + KWS_HOP_SAMPLES, kept * sizeof *window);
  } while (fread(window + kept, KWS_HOP_SAMPLES * sizeof *window, 1, audio) == 1);
  fclose(audio);
  return fclose(inputs ? inputs : outputs);
}
"""


def readme_sketch() -> str:
    return readme_code("cpp", "model_data.h")


def test_model_data_header_holds_the_manifests_labels_thresholds_and_detection_settings():
    tflite, manifest = resolve(None)
    header, source = c_array(tflite.read_bytes(), manifest)
    config = detection_config(manifest)
    constants = dict(re.findall(r"#define (KWS_\w+) (\w+)", header))
    hop_s = config.hop_frames * F.HOP_SAMPLES / F.SAMPLE_RATE
    assert constants == {
        "KWS_ARENA_BYTES": str(manifest["sizes"]["tflm_arena_bytes"]),
        "KWS_NUM_LABELS": str(len(manifest["labels"])),
        "KWS_HOP_FRAMES": str(config.hop_frames),
        "KWS_AVERAGE_RUNS": str(config.average_count),
        "KWS_MIN_COUNT": str(config.min_count),
        "KWS_QUIET_RUNS": str(math.ceil(config.suppression_ms / 1000 / hop_s - 1e-6) - 1),
        "KWS_MODEL_INPUT_SCALE_BITS": scale_bits(manifest["input"]["scale"]),
        "KWS_MODEL_INPUT_ZERO_POINT": str(manifest["input"]["zero_point"]),
    }
    labels = re.search(r"kws_labels\[KWS_NUM_LABELS\] = \{(.*)\};", source).group(1)
    assert re.findall(r'"(.*?)"', labels) == manifest["labels"]
    listed = re.search(r"kws_thresholds\[KWS_NUM_LABELS\] = \{(.*)\};", source).group(1)
    thresholds = [float(value) for value in listed.split(",")]
    keywords = set(stream.keywords(manifest["labels"]))
    assert thresholds == [config.threshold(label) if label in keywords else 2 for label in manifest["labels"]]
    code = re.sub(r"//.*", "", readme_sketch())
    assert not re.search(r"\d\.\d", code)  # the README's sketch takes them all from the header


@pytest.mark.parametrize("first", ["model_data.h", "kws_frontend.h"])
def test_a_frontend_and_model_of_different_exports_do_not_build_together(tmp_path, first):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    tflite, manifest = resolve(None)
    header, _ = c_array(tflite.read_bytes(), manifest)
    scale, zero_point = manifest["input"]["scale"], manifest["input"]["zero_point"]
    second = "kws_frontend.h" if first == "model_data.h" else "model_data.h"
    (tmp_path / "main.c").write_text(
        f'#include "{first}"\n#include "{second}"\nint main(void) {{ return 0; }}\n'
    )
    (tmp_path / "model_data.h").write_text(header)
    built = {}
    for export, quantization in {"same": (scale, zero_point), "another": (scale * 1.01, zero_point)}.items():
        (tmp_path / "kws_frontend.h").write_text(c_frontend_sources(*quantization)["kws_frontend.h"])
        built[export] = subprocess.run(
            [compiler, "-fsyntax-only", "-I", str(tmp_path), str(tmp_path / "main.c")],
            capture_output=True,
            text=True,
        )
    assert built["same"].returncode == 0, built["same"].stderr
    assert built["another"].returncode != 0
    assert (
        "kws_frontend.h and model_data.h come from different exports: copy both from one"
        in built["another"].stderr
    )


def build_sketch(folder: Path, model: Model, manifest: dict) -> Path:
    """The README's sketch with the export files ``manifest`` gives, against the TFLM stand-in."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++ or g++) on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    write_files(folder, c_frontend_sources(manifest["input"]["scale"], manifest["input"]["zero_point"]))
    header, source = c_array(model.content, manifest)
    write_files(folder, {"model_data.h": header, "model_data.cc": source})
    (folder / "tensorflow/lite/micro").mkdir(parents=True)
    (folder / "tensorflow/lite/micro/micro_interpreter.h").write_text(TFLM_STANDIN)
    (folder / "tensorflow/lite/micro/micro_mutable_op_resolver.h").write_text(
        '#pragma once\n#include "micro_interpreter.h"\n'
    )
    (folder / "sketch.cc").write_text(readme_sketch())
    (folder / "main.cc").write_text(SKETCH_HARNESS)
    defines = [
        f"-DOUTPUT_SCALE={manifest['output']['scale']!r}f",
        f"-DOUTPUT_ZERO_POINT={manifest['output']['zero_point']}",
        f"-DNUM_OUTPUTS={len(model.labels)}",
    ]
    binary = folder / "sketch"
    # The sketch alone under the flags firmware builds use: no silent int-to-float or double math.
    strict = ["-Wall", "-Wextra", "-Wconversion", "-Wdouble-promotion", "-Werror"]
    checked = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", *strict, "-I", str(folder), str(folder / "sketch.cc")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    built = subprocess.run(
        [compiler, "-std=c++17", "-O2", "-Wall", "-Werror", *defines, "-I", str(folder)]
        + [str(folder / "main.cc"), str(folder / "model_data.cc"), str(folder / "kws_frontend.c")]
        + ["-o", str(binary), "-lm"],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    return binary


def run_sketch(binary: Path, audio_file: Path, mode: str, data_file: Path) -> list[tuple[int, int]]:
    """(hop count, label index) of each event the sketch fires."""
    run = subprocess.run(
        [str(binary), str(audio_file), mode, str(data_file)], capture_output=True, text=True, check=True
    )
    return [tuple(map(int, line.split())) for line in run.stdout.splitlines()]


def frame_end(hops: int) -> float:
    """The stream time at the end of the hops-th frame, as kws.stream counts it."""
    return ((hops - 1) * F.HOP_SAMPLES + F.WINDOW_SAMPLES) / F.SAMPLE_RATE


@pytest.mark.parametrize(
    "settings",
    [
        {"hop_frames": 4, "average_ms": 500.0, "min_count": 3, "suppression_ms": 1500.0},
        {"hop_frames": 3, "average_ms": 300.0, "min_count": 2, "suppression_ms": 1000.0},
        {"hop_frames": 4, "average_ms": 250.0, "min_count": 9, "suppression_ms": 600.0},
        {"hop_frames": 1, "average_ms": 100.0, "min_count": 1, "suppression_ms": 0.0},
    ],
)
def test_readme_sketch_fires_as_the_detectors_rules_on_bursts_of_scores(settings, tmp_path):
    # Model outputs that make events close together, where averaging, the minimum count and the
    # quiet after an event decide: the sketch's events must be EventRules' to the hop.
    model = Model.load()
    keywords = stream.keywords(model.labels)
    detection = {**settings, "thresholds": {label: 0.45 for label in keywords}}
    binary = build_sketch(tmp_path, model, {**model.manifest, "detection": detection})
    hops = 3000
    np.zeros(F.WINDOW_SAMPLES + (hops - 1) * F.HOP_SAMPLES, np.int16).tofile(tmp_path / "audio.raw")
    runs, zero_point = hops // settings["hop_frames"], model.manifest["output"]["zero_point"]
    rng = np.random.default_rng(1)
    logits = rng.integers(-20, 20, (runs, len(model.labels))) + zero_point
    start = 0
    while start < runs:  # one label ahead of the others for 1-30 runs at a time
        length = int(rng.integers(1, 30))
        logits[start : start + length, rng.integers(len(model.labels))] += int(rng.integers(0, 30))
        start += length
    logits = np.clip(logits, -128, 127).astype(np.int8)
    logits.tofile(tmp_path / "replay.raw")
    fired = run_sketch(binary, tmp_path / "audio.raw", "replay", tmp_path / "replay.raw")
    ends = np.array(
        [frame_end(hop) for hop in range(settings["hop_frames"], hops + 1, settings["hop_frames"])]
    )
    events = EventRules(model.labels, DetectionConfig(**detection)).update(ends, model.probabilities(logits))
    assert len(events) >= 20
    assert [(model.labels[label], round(frame_end(hop), 3)) for hop, label in fired] == [
        (event.label, round(event.end, 3)) for event in events
    ]


@pytest.mark.integration
def test_readme_sketch_fires_as_the_detector(shared_data, tmp_path):
    model = Model.load()
    binary = build_sketch(tmp_path, model, model.manifest)
    # Two of each keyword with a second of quiet around each.
    root = shared_data / "speech_commands"
    rng = np.random.default_rng(0)
    pieces = []
    for word in WORDS:
        for path in sorted(path for path in (root / word).iterdir() if audio.is_audio_file(path))[:2]:
            pieces += [0.002 * rng.standard_normal(F.SAMPLE_RATE), audio.fix_length(audio.load(path))]
    samples = to_int16(np.concatenate(pieces))
    samples.tofile(tmp_path / "audio.raw")

    def sketch(mode: str) -> list[tuple[str, float]]:
        events = run_sketch(binary, tmp_path / "audio.raw", mode, tmp_path / f"{mode}.raw")
        return [(model.labels[label], round(frame_end(hops), 3)) for hops, label in events]

    sketch("record")
    inputs = np.fromfile(tmp_path / "record.raw", dtype=np.int8).reshape(-1, F.NUM_FRAMES, F.NUM_MFCC)
    model.raw_scores(inputs).tofile(tmp_path / "replay.raw")
    fired = sketch("replay")

    expected = [(event.label, round(event.end, 3)) for event in Detector(model).push(samples / 32768)]
    assert len(expected) >= 8  # half of the 16 keywords or more: enough events to compare
    assert fired == expected
