"""Median LiteRT latency of one int8 inference, against the float32 model in the same run.

    python bench/infer.py [--model EXPORT_DIR]   (default: the built-in model)

Rounds alternate between the two models so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kws.features import NUM_FRAMES, NUM_MFCC
from kws.runtime import Model, ModelError, resolve

ROUNDS = 20
CALLS_PER_ROUND = 200


def latency_us(
    models: dict[str, Model], rounds: int = ROUNDS, calls: int = CALLS_PER_ROUND
) -> dict[str, float]:
    """Each model's median microseconds per inference over ``rounds`` of ``calls``, the rounds
    alternating between the models."""
    batch = np.random.default_rng(0).normal(-5, 15, (calls, NUM_FRAMES, NUM_MFCC))
    prepared = {name: model.prepare(batch) for name, model in models.items()}
    for name, model in models.items():  # warm-up
        model.raw_scores(prepared[name][:20])
    timings = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.raw_scores(prepared[name])
            timings[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: float(np.median(values)) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="export folder, with both models (default: the built-in model)")
    args = parser.parse_args()
    try:
        int8, manifest = resolve(args.model, named="--model")
    except ModelError as error:
        parser.error(str(error))
    if not (int8.parent / manifest.get("files", {}).get("float32", "-")).is_file():
        parser.error(f"{int8.parent} has no float32 model to compare with: pass a folder made by kws export")
    models = {kind: Model(int8.parent / manifest["files"][kind], manifest) for kind in ("int8", "float32")}
    medians = latency_us(models)
    for kind, value in medians.items():
        print(f"{kind:8s} {value:8.1f} us per inference (median of {ROUNDS} rounds x {CALLS_PER_ROUND})")
    print(f"float32 / int8 time ratio: {medians['float32'] / medians['int8']:.2f}")


if __name__ == "__main__":
    main()
