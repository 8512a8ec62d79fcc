"""Median LiteRT latency of one int8 inference, against the float32 model in the same run.

    python bench/infer.py [EXPORT_DIR]   (default: the built-in model)

Rounds alternate between the two models so that machine noise hits both alike.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from kws.features import NUM_FRAMES, NUM_MFCC
from kws.runtime import BUILT_IN_MODEL, MANIFEST_FILE, Model

ROUNDS = 20
CALLS_PER_ROUND = 200


def median_us(model: Model, prepared: np.ndarray, samples: list[float]) -> None:
    start = time.perf_counter()
    model.raw_scores(prepared)
    samples.append((time.perf_counter() - start) / len(prepared) * 1e6)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else BUILT_IN_MODEL
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    models = {kind: Model(folder / manifest["files"][kind], manifest) for kind in ("int8", "float32")}
    features = np.random.default_rng(0).normal(-5, 15, (CALLS_PER_ROUND, NUM_FRAMES, NUM_MFCC))
    prepared = {kind: model.prepare(features) for kind, model in models.items()}
    timings = {kind: [] for kind in models}
    for kind, model in models.items():  # warm-up
        model.raw_scores(prepared[kind][:20])
    for _ in range(ROUNDS):
        for kind, model in models.items():
            median_us(model, prepared[kind], timings[kind])
    medians = {kind: float(np.median(values)) for kind, values in timings.items()}
    for kind, value in medians.items():
        print(f"{kind:8s} {value:8.1f} us per inference (median of {ROUNDS} rounds x {CALLS_PER_ROUND})")
    print(f"float32 / int8 time ratio: {medians['float32'] / medians['int8']:.2f}")


if __name__ == "__main__":
    main()
