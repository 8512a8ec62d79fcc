"""Why depthwise-separable: a standard-conv CNN of the same layout against the DS-CNN, measured.

    python bench/architectures.py [--epochs N] [--data DIR] [--negatives DIR] [--out runs/architectures]

Both models train on the same data with the same schedule (the default `kws train`
recipe, shortened with --epochs); each is converted to float32 and int8 TFLite, scored on
the validation split, and timed with LiteRT (median microseconds per inference, rounds
alternating between the models so machine noise hits all alike). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from infer import latency_us

from kws import features
from kws.data import DataConfig, SpeechData
from kws.export import calibration_features, convert, draft_manifest
from kws.model import ModelConfig
from kws.runtime import Model
from kws.train import MODEL_FILE, RunConfig, TrainConfig, train

WORDS = ["yes", "no", "up", "down", "left", "right", "stop", "go"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/speech_commands")
    parser.add_argument("--negatives", action="append", default=None)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--out", type=Path, default=Path("runs/architectures"))
    args = parser.parse_args()
    import keras  # after parsing: --help answers without loading TensorFlow

    negatives = args.negatives if args.negatives is not None else ["../shared/data/librispeech"]
    data_config = DataConfig(args.data, words=WORDS, negatives=negatives)

    variants = {"standard CNN": ModelConfig(separable=False), "DS-CNN": ModelConfig()}
    rows, runners = {}, {}
    for name, model_config in variants.items():
        run_dir = args.out / name.replace(" ", "-").lower()
        config = RunConfig(data=data_config, model=model_config, train=TrainConfig(epochs=args.epochs))
        metrics = train(config, run_dir, resume=(run_dir / "config.json").exists())
        keras_model = keras.models.load_model(run_dir / MODEL_FILE, compile=False)
        data = SpeechData(config.data)
        validation = data.evaluation_set("validation")
        val_features = features.mfcc(validation.audio)
        manifest = draft_manifest(config)
        for kind in ("float32", "int8"):
            calibration = calibration_features(data, config) if kind == "int8" else None
            tflite = convert(keras_model, kind, calibration)
            runner = Model(tflite, manifest)
            accuracy = float((runner.scores(val_features).argmax(axis=1) == validation.labels).mean())
            key = f"{name} {kind}"
            runners[key] = runner
            rows[key] = {
                "parameters": metrics["parameters"],
                "macs": metrics["macs"],
                "bytes": len(tflite),
                "accuracy": accuracy,
            }
    for key, value in latency_us(runners).items():
        rows[key]["latency_us"] = value

    print(f"\n{args.epochs} epochs each, same data and schedule; validation: 8 keywords, silence, unknown\n")
    print("| model | parameters | MACs | .tflite size | LiteRT latency | validation accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, row in rows.items():
        print(
            f"| {key} | {row['parameters']:,} | {row['macs'] / 1e6:.2f} M | {row['bytes'] / 1024:.1f} KiB | "
            f"{row['latency_us']:.0f} us | {row['accuracy']:.2%} |"
        )
    cnn, ds_cnn = rows["standard CNN int8"], rows["DS-CNN int8"]
    print(
        f"\nint8, standard CNN / DS-CNN: {cnn['parameters'] / ds_cnn['parameters']:.1f}x the parameters, "
        f"{cnn['macs'] / ds_cnn['macs']:.1f}x the MACs, {cnn['bytes'] / ds_cnn['bytes']:.1f}x the size, "
        f"{cnn['latency_us'] / ds_cnn['latency_us']:.1f}x the latency; validation accuracy "
        f"{100 * (cnn['accuracy'] - ds_cnn['accuracy']):+.2f} points"
    )


if __name__ == "__main__":
    main()
