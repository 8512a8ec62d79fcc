"""Exporting a trained run for devices: int8/float16/float32 TFLite, manifest, MCU bundle."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kws import KwsError, __version__, features, plots
from kws.c_frontend import QUANTIZATION_CHECK, c_frontend_sources, scale_bits
from kws.data import SpeechData
from kws.evaluate import percent, report
from kws.files import json_text, write_files
from kws.model import count_macs
from kws.runtime import (
    CONFIG_FILE,
    LOGITS,
    MANIFEST_FILE,
    Model,
    ModelError,
    embed_manifest,
    quiet_stderr,
    resolve,
    without_manifest,
)
from kws.stream import FA_TARGET_PER_HOUR, HOP_MS, SILENCE, UNKNOWN, DetectionConfig, duration, keywords
from kws.stream_eval import stream_test
from kws.train import RunConfig, latest_checkpoint, load_trained, trained_run

MODEL_CARD = "MODEL_CARD.md"
DET_PLOT = "det_curve.png"
MODEL_FILES = {
    "int8": "model_int8.tflite",
    "float16": "model_float16.tflite",
    "float32": "model_float32.tflite",
}
# Each model file's size in the manifest's sizes: known only once the file is made, so not in its own copy.
FILE_SIZES = {f"{kind}_bytes" for kind in MODEL_FILES}
CALIBRATION_PER_LABEL = 50
NEVER = 2.0  # a threshold no average of softmax scores reaches: for _silence_ and _unknown_


class ExportError(KwsError):
    """An export that cannot be completed; the message says why and what to do."""


def calibration_features(data: SpeechData, config: RunConfig, per_label: int = CALIBRATION_PER_LABEL):
    """A class-balanced sample of augmented training features: what the int8 ranges must cover."""
    rng = np.random.default_rng([config.train.seed, 1_000_000])
    batch, labels = data.training_epoch(rng, config.augment)
    picks = [
        rng.permutation(np.flatnonzero(labels == label))[:per_label] for label in range(len(data.labels))
    ]
    return batch[np.concatenate(picks)]


def logits_model(model):
    """The trained classifier without its final softmax, at a fixed batch of 1.

    The runtime applies the softmax in float (runtime.LOGITS). A fixed batch makes every
    shape static: no SHAPE/PACK ops for a device to run.
    """
    import keras

    scores = model.get_layer("scores")
    single = keras.Input(shape=(features.NUM_FRAMES, features.NUM_MFCC), batch_size=1, name="mfcc")
    pooled = keras.Model(model.inputs, scores.input)(single)
    head = keras.layers.Dense(scores.units, name="logits")
    logits = head(pooled)
    head.set_weights(scores.get_weights())
    return keras.Model(single, logits)


def draft_manifest(config: RunConfig) -> dict:
    """What ``Model`` needs to run a model ``convert`` made before its manifest is written."""
    return {"labels": config.labels, "frontend": config.frontend, "output": {"values": LOGITS}}


def convert(model, kind: str, calibration: np.ndarray | None = None) -> bytes:
    """The Keras model as a batch-1 .tflite of logits: "float32", "float16" weights, or full-integer
    "int8"."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(logits_model(model))
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":

        def representative():
            for example in calibration:
                yield [example[None].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif kind != "float32":
        raise ValueError(f"unknown model kind {kind!r}")
    # The converter prints the SavedModel it writes in between (endpoints, tensor specs): noise to a user.
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def tflm_arena_bytes(tflite: bytes) -> int | None:
    """Tensor arena the TFLM interpreter needs for this model (None without tflite-micro).

    ExportError, with what TFLM logged, if TFLM cannot run the model.
    """
    try:
        from tflite_micro.python.tflite_micro import runtime as tflm
    except ImportError:
        return None
    failed = False
    with quiet_stderr() as log:
        try:
            interpreter = tflm.Interpreter.from_bytes(tflite)
            details = interpreter.get_input_details(0)
            interpreter.set_input(np.zeros(details["shape"], dtype=details["dtype"]), 0)
            interpreter.invoke()
            interpreter.print_allocations()
        except RuntimeError:  # it says only "failed"; why is in what TFLM logged
            failed = True
        sys.stderr.flush()
        log.seek(0)
        printed = log.read().decode(errors="replace")
    found = re.search(r"Arena allocation total (\d+) bytes", printed)
    if failed or not found:
        said = " ".join(printed.split())[-400:] if failed else "it printed no arena total"
        raise ExportError(
            f"TensorFlow Lite Micro cannot run the int8 model, so the MCU bundle would not work ({said}): "
            "try another tflite-micro version, or uninstall it to export without the arena size"
        )
    return int(found.group(1))


def c_array(tflite: bytes, manifest: dict, name: str = "kws_model_data") -> tuple[str, str]:
    """model_data.h and model_data.cc: the .tflite as an aligned byte array, as TFLM's examples do;
    the tensor arena it needs (KWS_ARENA_BYTES) where export could measure it; and what a device's
    detector takes from the manifest: the labels, their thresholds and the Detector's settings."""
    # The manifest inside the .tflite is for readers of the file; firmware would carry it in
    # flash (4.4 KB of the built-in model's 54 KB) and never read it.
    tflite = without_manifest(tflite)
    arena_bytes = manifest["sizes"]["tflm_arena_bytes"]
    arena = (
        f"/* The tensor arena the model needs, measured with TFLM's recording allocator. */\n"
        f"#define KWS_ARENA_BYTES {arena_bytes}\n\n"
        if arena_bytes
        # A build that guessed the arena would fail at run time on the device, not here.
        else "#ifndef KWS_ARENA_BYTES\n"
        '#error "kws export could not measure the tensor arena: install tflite-micro '
        '(pip install tflite-micro) and export again, or define KWS_ARENA_BYTES"\n'
        "#endif\n\n"
    )
    labels, detection = manifest["labels"], DetectionConfig(**manifest["detection"])
    hop_seconds = detection.hop_frames * HOP_MS / 1000
    # Model runs after an event that may not fire: those that end within suppression_ms of it.
    quiet_runs = max(0, math.ceil(detection.suppression_ms / 1000 / hop_seconds - 1e-6) - 1)
    header = (
        "/* Generated by kws export: the int8 keyword model for TensorFlow Lite Micro. */\n"
        "#ifndef KWS_MODEL_DATA_H\n#define KWS_MODEL_DATA_H\n\n"
        f"{arena}extern const unsigned char {name}[];\nextern const unsigned int {name}_len;\n\n"
        "/* From manifest.json: the model's labels in order, and the Detector's settings (\"detection\")\n"
        "   that its thresholds were calibrated with. */\n"
        f"#define KWS_NUM_LABELS {len(labels)}\n"
        f"#define KWS_HOP_FRAMES {detection.hop_frames} /* run the model every this many frames */\n"
        f"#define KWS_AVERAGE_RUNS {detection.average_count} /* scores averaged over this many runs */\n"
        f"#define KWS_MIN_COUNT {detection.min_count} /* runs before an event may fire, its own included */\n"
        f"#define KWS_QUIET_RUNS {quiet_runs} /* runs after an event that fire nothing */\n"
        "extern const char *const kws_labels[KWS_NUM_LABELS];\n"
        "/* Per label, for the averaged softmax score; above 1 for labels that never fire. */\n"
        "extern const double kws_thresholds[KWS_NUM_LABELS];\n\n"
        "/* The input quantization, which kws_frontend.h of the same export applies. */\n"
        f"#define KWS_MODEL_INPUT_SCALE_BITS {scale_bits(manifest['input']['scale'])}\n"
        f"#define KWS_MODEL_INPUT_ZERO_POINT {manifest['input']['zero_point']}\n"
        f"{QUANTIZATION_CHECK}\n#endif\n"
    )
    spotted = set(keywords(labels))
    names = ", ".join(json.dumps(label) for label in labels)
    # Doubles: the thresholds that keep false accepts rare lie within 1e-6 of 1, near float32's step.
    thresholds = ", ".join(
        repr(float(detection.threshold(label) if label in spotted else NEVER)) for label in labels
    )
    rows = [", ".join(f"0x{b:02x}" for b in tflite[i : i + 12]) for i in range(0, len(tflite), 12)]
    source = (
        '#include "model_data.h"\n\n'
        "/* TFLM reads the flatbuffer in place: 16-byte alignment keeps its tensors aligned. */\n"
        f"alignas(16) const unsigned char {name}[] = {{\n  " + ",\n  ".join(rows) + "\n};\n"
        f"const unsigned int {name}_len = {len(tflite)};\n\n"
        f"const char *const kws_labels[KWS_NUM_LABELS] = {{{names}}};\n"
        f"const double kws_thresholds[KWS_NUM_LABELS] = {{{thresholds}}};\n"
    )
    return header, source


def export(run_dir: Path, out_dir: Path, target_fa_per_hour: float = FA_TARGET_PER_HOUR) -> dict:
    """Write every deployable file of a trained run into ``out_dir``; return the manifest.

    Besides converting and measuring the model, the export calibrates the Detector's
    per-keyword thresholds to ``target_fa_per_hour`` on the held-out test stream.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = checked_run(run_dir)  # before keras loads, so that a wrong run is reported at once
    progress = training_progress(run_dir, config)
    model, digest = load_trained(run_dir, config)
    data = SpeechData(config.data)

    # Every bar is drawn on a terminal only (disable=None): a log would get each redraw.
    steps = tqdm(total=7, desc="export", unit="step", disable=None)
    converted = {}
    for kind in ("float32", "float16"):
        converted[kind] = convert(model, kind)
        steps.update()
    converted["int8"] = convert(model, "int8", calibration_features(data, config))
    steps.update()
    accuracy = validation_accuracy(converted, config, data)
    steps.update()
    arena = tflm_arena_bytes(converted["int8"])
    steps.update()
    int8_model = _as_on_a_device(converted["int8"], draft_manifest(config))
    detection, streaming = stream_test(int8_model, data, DetectionConfig(), target_fa_per_hour)
    steps.update()
    manifest = {
        "kws_version": __version__,
        "name": run_dir.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": dict(MODEL_FILES),
        "labels": config.labels,
        "frontend": config.frontend,
        "input": int8_model.tensor_spec("input"),
        "output": int8_model.tensor_spec("output"),
        "accuracy": accuracy,
        "sizes": {
            # From the model, not metrics.json: a run whose training was interrupted has none.
            "parameters": int(model.count_params()),
            "macs": count_macs(model),
            "tflm_arena_bytes": arena,
        },
        "detection": detection.to_dict(),
        "streaming": streaming_summary(streaming, target_fa_per_hour),
        "model": config.model.to_dict(),
        "training": {
            **config.data_record(),
            "augment": asdict(config.augment),
            "train": asdict(config.train),
            **progress,
            "model_sha256": digest,
        },
    }
    write_artifacts(out_dir, converted, manifest, streaming["det"])
    steps.update()
    steps.close()
    return json.loads((out_dir / MANIFEST_FILE).read_text())  # as written: JSON's lists, not tuples


def checked_run(run_dir: Path) -> RunConfig:
    """The config of a run that can be exported: its frontend is this kws's, its model and data exist."""
    config = trained_run(run_dir)
    if not Path(config.data.data_dir).is_dir():
        raise FileNotFoundError(
            f"the run's data {config.data.data_dir} is missing (export calibrates int8 ranges and "
            'measures accuracy on it): put it back there, or set data_dir under "data" in '
            f"{run_dir / CONFIG_FILE} to where it is now"
        )
    return config


def training_progress(run_dir: Path, config: RunConfig) -> dict:
    """The epochs a run has trained and its best one, from its last checkpoint; a warning if
    fewer than its config's (training goes on, or was stopped)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:  # runs from before checkpoints were kept
        return {}
    done, best = checkpoint[1]["epochs_done"], checkpoint[1]["best_epoch"]
    if done < config.train.epochs:
        tqdm.write(
            f"warning: {run_dir} has trained {done} of its {config.train.epochs} epochs (training goes on, "
            f"or was stopped): this exports its best so far, epoch {best}; export again once it is done",
            file=sys.stderr,
        )
    return {"epochs_trained": done, "best_epoch": best}


def validation_accuracy(converted: dict[str, bytes], config: RunConfig, data: SpeechData) -> dict:
    """The manifest's accuracy: each model file scored on the validation split by the runtime
    that devices and services use, and the int8 model's recall per class."""
    validation = data.evaluation_set("validation")
    val_features = features.mfcc(validation.audio)
    reports = {}
    for kind, tflite in converted.items():
        predictions = Model(tflite, draft_manifest(config)).scores(val_features).argmax(axis=1)
        reports[kind] = report(
            config.labels, validation.labels, predictions, validation.sources, validation.words
        )
    accuracy = {kind: result["accuracy"] for kind, result in reports.items()}
    return {
        "split": "validation",
        "examples": int(len(validation.labels)),
        **{kind: round(value, 5) for kind, value in accuracy.items()},
        "int8_drop_points": round(100 * (accuracy["float32"] - accuracy["int8"]), 3),
        # The card's composition: evaluation fills each class up to its share only while the data
        # has held-out clips for it.
        "examples_per_class": {label: row["support"] for label, row in reports["int8"]["per_class"].items()},
        "int8_per_class_recall": {
            # 6 places: rounded again to a tenth of a percent in the model card, 4 would round twice
            label: None if row["recall"] is None else round(row["recall"], 6)
            for label, row in reports["int8"]["per_class"].items()
        },
    }


def streaming_summary(report: dict, target_fa_per_hour: float) -> dict:
    """What the manifest records of a stream test: the figures, not the DET points."""
    return {"target_fa_per_hour": target_fa_per_hour, **{k: v for k, v in report.items() if k != "det"}}


def _as_on_a_device(int8: bytes | Path, manifest: dict) -> Model:
    """The int8 model run as TFLite Micro runs it, to calibrate thresholds on: TFLite's reference
    kernels round as TFLM does (LiteRT's default, XNNPACK, moves 0.8 % of the top classes, and
    thresholds calibrated on it let 2 false accepts through on TFLM where they allowed none). The
    thresholds then hold on a device (and, for the built-in model, under XNNPACK too); the
    reference kernels are ~20 times slower, which calibration can afford."""
    return Model(int8, manifest, reference_kernels=True)


def recalibrate(
    model_dir: Path, data: SpeechData, config: DetectionConfig, target_fa_per_hour: float
) -> dict:
    """New thresholds for an exported model, written into its manifest, .tflite files and C array.

    They are chosen on the int8 model whichever file ``model_dir`` names: one set goes into
    every file, and the int8 model is what a device runs and what ``--model FOLDER`` loads.
    """
    named, manifest = resolve(model_dir)
    folder = named.parent
    missing = [name for name in manifest["files"].values() if not (folder / name).is_file()]
    if missing:
        raise ModelError(
            f"{folder} has no {', '.join(missing)}: calibrate rewrites every file of an export, so pass "
            "a folder made by kws export or a .tflite in one"
        )
    converted = {kind: (folder / name).read_bytes() for kind, name in manifest["files"].items()}
    int8 = _as_on_a_device(folder / manifest["files"]["int8"], manifest)
    detection, streaming = stream_test(int8, data, config, target_fa_per_hour)
    manifest["detection"] = detection.to_dict()
    manifest["streaming"] = streaming_summary(streaming, target_fa_per_hour)
    # Exports made without tflite-micro installed, or before kws recorded it, have none.
    if manifest["sizes"].get("tflm_arena_bytes") is None:
        manifest["sizes"]["tflm_arena_bytes"] = tflm_arena_bytes(converted["int8"])
    write_artifacts(folder, converted, manifest, streaming["det"])
    return manifest


def write_artifacts(
    out_dir: Path, converted: dict[str, bytes], manifest: dict, det_points: list[dict]
) -> None:
    """The .tflite files (manifest embedded), manifest.json, the MCU bundle and the DET curve of
    ``det_points`` with the manifest's calibrated operating point.

    Every file's content is made before any is written, and they are written as one set
    (``write_files``), so that a failure leaves the folder's files as they were rather than some
    new and some old.
    """
    # Sizes are of the files as written, metadata included; recorded in the manifest file only
    # (a manifest that knew its own file's size would change that size).
    sizes = {key: value for key, value in manifest["sizes"].items() if key not in FILE_SIZES}
    final = {}
    for kind, tflite in converted.items():
        # Each file's copy describes its own tensors (float in the float files), for a reader of one file.
        model = Model(tflite, manifest)
        tensors = {part: model.tensor_spec(part) for part in ("input", "output")}
        final[kind] = embed_manifest(tflite, {**manifest, "sizes": sizes, **tensors})
    manifest["sizes"].update({f"{kind}_bytes": len(tflite) for kind, tflite in final.items()})
    header, source = c_array(final["int8"], manifest)
    write_files(
        out_dir,
        {
            **{MODEL_FILES[kind]: tflite for kind, tflite in final.items()},
            MANIFEST_FILE: json_text(manifest),
            "model_data.h": header,
            "model_data.cc": source,
            MODEL_CARD: model_card(manifest),
            DET_PLOT: plots.det_curve(det_points, manifest["streaming"], "calibrated thresholds"),
            **c_frontend_sources(manifest["input"]["scale"], manifest["input"]["zero_point"]),
        },
    )


def _composition(accuracy: dict) -> str:
    """How many examples the accuracy rests on, and how many of them are fillers (earlier
    exports' manifests did not count them)."""
    examples, counts = accuracy["examples"], accuracy.get("examples_per_class")
    if counts is None:
        return f"{examples} examples"
    return f"{examples} examples, " + ", ".join(
        f"{counts.get(label, 0)} {label}" for label in (SILENCE, UNKNOWN)
    )


def model_card(manifest: dict) -> str:
    """MODEL_CARD.md: what the model is, what it was trained on, and how good it measured."""
    accuracy, sizes, streaming = manifest["accuracy"], manifest["sizes"], manifest["streaming"]
    detection, frontend = manifest["detection"], manifest["frontend"]
    data, train, model = manifest["training"]["data"], manifest["training"]["train"], manifest["model"]
    counts = manifest["training"].get("clips_per_split", {})
    spotted = keywords(manifest["labels"])
    # Exports of runs without metrics.json, before export counted them itself, recorded None.
    parameters = "unknown" if sizes["parameters"] is None else f"{sizes['parameters']:,}"
    macs = "unknown" if sizes["macs"] is None else f"{sizes['macs'] / 1e6:.2f} M"
    lines = [
        f"# {manifest['name']}: keyword spotter for {', '.join(spotted)}",
        "",
        f"DS-CNN-{model['size'].upper()} ({parameters} parameters, {macs} "
        f"multiply-accumulates per inference) on {frontend['num_frames']} x {frontend['num_mfcc']} MFCCs "
        f"of the last second of {frontend['sample_rate'] // 1000} kHz audio; "
        f"labels {', '.join(manifest['labels'])}. Made by kws {manifest['kws_version']} on "
        f"{manifest['created'][:10]}.",
        "",
        "## Files",
        f"- `model_int8.tflite`: {sizes['int8_bytes']:,} bytes, full-integer; TFLM tensor arena "
        f"{sizes['tflm_arena_bytes'] or 'not measured'} bytes",
        f"- `model_float16.tflite` ({sizes['float16_bytes']:,} B), "
        f"`model_float32.tflite` ({sizes['float32_bytes']:,} B)",
        "- Each model outputs logits; the scores the thresholds apply to are their softmax",
        "- `manifest.json`: everything needed to run it (also embedded in each .tflite)",
        "",
        "## Training data",
        f"- Keyword clips: {data['data_dir']} (training split: "
        + ", ".join(
            f"{word} {count}" for word, count in counts.get("training", {}).items() if word in spotted
        )
        + ")",
        *_extra_lines(manifest["training"], spotted),
        f"- `_unknown_`: {data['unknown_share']:.0%} of examples; other words, "
        + (
            f"random 1 s windows of {', '.join(data['negatives'])}"
            if data["negatives"]
            else "no negative speech"
        )
        + (
            f", {data['partial_fraction']:.0%} of them keyword fragments"
            if data.get("partial_fraction")
            else ""
        ),
        # None: a run from before noise_files was recorded; its card keeps the line it had.
        f"- `_silence_`: {data['silence_share']:.0%} of examples, background noise from near silence "
        "to full level"
        if manifest["training"].get("noise_files") != []
        else "- `_silence_`: none: no background noise was found, so the model never heard silence",
        f"- Recipe: {_epochs(manifest['training'])}, batch {train['batch_size']}, Adam, learning rates "
        f"{' -> '.join(str(r) for r in train['learning_rates'])}, seed {train['seed']}",
        "",
        "## Measured (held-out validation split; the official test set was not used)",
        f"- Accuracy over {len(manifest['labels'])} classes ({_composition(accuracy)}): "
        f"float32 {accuracy['float32']:.2%}, int8 {accuracy['int8']:.2%}",
        "- int8 recall per class: "
        + ", ".join(f"{k} {percent(v)}" for k, v in accuracy["int8_per_class_recall"].items()),
        f"- Streaming (model every {HOP_MS * detection['hop_frames']:g} ms, scores averaged over "
        f"{detection['average_ms']:g} ms), default thresholds (calibrated to "
        f"{streaming['target_fa_per_hour']} false accepts per "
        f"hour): recall {percent(streaming['recall'])} of {streaming['keywords']} keywords in a "
        f"{duration(streaming['stream_hours'])} test stream, {streaming['false_accepts_per_hour']:.2f} false "
        "accepts per hour; the int8 model run as TensorFlow Lite Micro runs it (LiteRT's reference "
        "kernels: kws itself runs LiteRT's faster default kernels, which round a little differently)",
    ]
    if "real_speech" in streaming:
        speech = streaming["real_speech"]
        lines += [
            f"- Held-out real speech without keywords ({duration(speech['hours'])}): "
            f"{speech['false_accepts']} false accepts ({speech['false_accepts_per_hour']:.2f} per hour)",
            "- The thresholds were chosen on this stream, which holds this speech too (amid noise and "
            "keywords), so the two lines above are what calibration reached, not an independent test: "
            "expect more false accepts on new audio",
        ]
    lines += [f"- Training warned: {warning}" for warning in manifest["training"].get("warnings", [])]
    lines += [f"- Calibration warned: {warning}" for warning in streaming.get("warnings", [])]
    lines += [
        "- Thresholds: " + ", ".join(f"{k} {v}" for k, v in manifest["detection"]["thresholds"].items()),
        "",
        "## Limits",
        "- Trained on short, isolated words in 1 s clips; voices, accents, far-field microphones and "
        "noise unlike the training clips' will lower recall.",
        "- Words it never heard can still be taken for keywords; the false-accept figures above are the "
        "best guide to how often.",
        "- The weights are made from the training data above: share them as its licences allow (Speech "
        "Commands and LibriSpeech are CC BY 4.0: credit P. Warden, arXiv:1804.03209, and V. Panayotov et "
        "al., ICASSP 2015)",
        "",
    ]
    return "\n".join(lines)


def _extra_lines(training: dict, spotted: list[str]) -> list[str]:
    """The card's lines for --extra folders: how many of the training clips are theirs."""
    lines = []
    for folder, counts in training.get("extra_clips", {}).items():
        others = sum(count for word, count in counts.items() if word not in spotted)
        lines.append(
            f"- Of them, from {folder} (training only, never validated on): "
            + ", ".join(f"{word} {counts.get(word, 0)}" for word in spotted)
            + f"; and {others} clips of other words"
        )
    return lines


def _epochs(training: dict) -> str:
    planned, done = training["train"]["epochs"], training.get("epochs_trained")
    epochs = f"{planned} epoch{'s' * (planned != 1)}"
    if done is None:  # exported before the manifest recorded it
        return epochs
    trained = epochs if done == planned else f"{done} of {planned} planned epochs"
    return f"{trained} (best: epoch {training['best_epoch']})"
