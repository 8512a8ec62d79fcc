"""CPU cost of the streaming Detector per second of audio, against a naive detector in the same run.

    python bench/stream.py [--model MODEL]   (default: the built-in model)

The naive detector recomputes the MFCCs of the whole last second at every hop, as a
detector built from the batch frontend would; ours computes one new frame per hop.
Both run the same model at the same hop and the same event rules. Rounds alternate
between the two so machine noise hits both alike; figures are process CPU time, the
median of the rounds and, for the detector, the best one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kws.features import CLIP_SAMPLES, HOP_SAMPLES, SAMPLE_RATE, mfcc
from kws.runtime import Model, ModelError
from kws.stream import DetectionConfig, Detector, EventRules

SECONDS = 30
ROUNDS = 5


class NaiveDetector:
    """Every hop: MFCCs of the last 1 s from scratch, then the model and the same event rules."""

    def __init__(self, model: Model, config: DetectionConfig):
        self.model, self.config = model, config
        self.rules = EventRules(model.labels, config)

    def detect(self, audio: np.ndarray) -> list:
        self.rules.reset()
        events = []
        hop = HOP_SAMPLES * self.config.hop_frames
        for end in range(CLIP_SAMPLES, len(audio) + 1, hop):
            scores = self.model.scores(mfcc(audio[end - CLIP_SAMPLES : end]))
            events += self.rules.update(np.array([end / SAMPLE_RATE]), scores)
        return events


def cpu_seconds(run, *args) -> float:
    start = time.process_time()
    run(*args)
    return time.process_time() - start


def stream(detector: Detector, audio: np.ndarray, chunk: int = 512) -> None:
    """Push audio in microphone-sized chunks (512 samples is a typical callback)."""
    detector.reset()
    for start in range(0, len(audio), chunk):
        detector.push(audio[start : start + chunk])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="export folder or .tflite (default: the built-in model)")
    args = parser.parse_args()
    try:
        model = Model.load(args.model, named="--model")
    except ModelError as error:
        parser.error(str(error))
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(SECONDS * SAMPLE_RATE)).astype(np.float32)
    default = model.manifest.get("detection", {}).get("hop_frames", 1)
    for hop_frames in sorted({1, 2, default}):
        config = DetectionConfig(**{**model.manifest.get("detection", {}), "hop_frames": hop_frames})
        ours, naive = Detector(model, config), NaiveDetector(model, config)
        costs = {"detector": [], "naive": []}
        for _ in range(ROUNDS):
            costs["detector"].append(cpu_seconds(stream, ours, audio) / SECONDS)
            costs["naive"].append(cpu_seconds(naive.detect, audio) / SECONDS)
        detector, baseline = (float(np.median(costs[name])) for name in ("detector", "naive"))
        # Other jobs only ever add CPU time: the best round is the cost without them (as timeit argues).
        best = min(costs["detector"])
        print(
            f"hop {hop_frames * 20} ms: detector {100 * detector:.3f} % of one core (best round "
            f"{100 * best:.3f} %), naive {100 * baseline:.3f} %, naive / detector {baseline / detector:.1f}x"
        )


if __name__ == "__main__":
    main()
