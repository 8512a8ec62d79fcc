"""Cold start of `kws detect FILE` on a 1 s file with the built-in model, against bare Python.

    python bench/startup.py [--model M] [--runs N]

Each run is a fresh process (no warm imports), as a user's first command is; runs
alternate between kws and `python -c pass` so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="export folder or .tflite (default: the built-in model)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "one_second.wav"
        t = np.arange(16000) / 16000
        sf.write(clip, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
        detect = [sys.executable, "-m", "kws", "detect", str(clip), "--json"]
        if args.model:
            detect += ["--model", args.model]
        bare = [sys.executable, "-c", "pass"]
        times = {"kws detect": [], "python -c pass": []}
        for _ in range(args.runs):
            times["kws detect"].append(wall_seconds(detect))
            times["python -c pass"].append(wall_seconds(bare))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:16s} {value:6.3f} s (median of {args.runs} cold starts)")
    print(f"kws detect / bare Python: {medians['kws detect'] / medians['python -c pass']:.1f}x")


if __name__ == "__main__":
    main()
