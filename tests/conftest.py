"""Shared fixtures: synthetic Speech Commands folders, and the real data where a test needs it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KWS_SHARED_DATA", REPO.parent / "shared" / "data"))
WORD_TONES = {"yes": 400.0, "no": 700.0, "up": 1000.0, "down": 1300.0, "bed": 1900.0, "cat": 2500.0}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped where absent, but a failure under CI=true, where it must exist."""
    if not (SHARED_DATA / "speech_commands").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared data is missing at {SHARED_DATA}")
        pytest.skip(f"real data not found at {SHARED_DATA} (set KWS_SHARED_DATA)")
    return SHARED_DATA


def readme_code(language: str, holding: str) -> str:
    """The README's one ``language`` code block that holds ``holding``: tests run its examples."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [block for block in blocks if holding in block]
    assert len(found) == 1, f"README.md has {len(found)} {language} blocks holding {holding!r}"
    return found[0]


def need(available, reason):
    """Skip without ``available``, except under CI=true, whose .ci/run installs what these tests need."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def shared_validation(manifest: dict, shared: Path):
    """The validation examples of the data a model's manifest records, read from ``shared``."""
    from kws.data import DataConfig, SpeechData

    recorded = manifest["training"]["data"]
    overrides = {"data_dir": str(shared / "speech_commands"), "negatives": [str(shared / "librispeech")]}
    return SpeechData(DataConfig(**{**recorded, **overrides})).evaluation_set("validation")


def tone(
    freq: float, seconds: float = 1.0, rate: int = 16000, level: float = 0.3, seed: int = 0
) -> np.ndarray:
    """A 'word': a tone burst in the middle of the clip with a little noise around it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.exp(-(((t - seconds / 2) / (0.15 * seconds)) ** 2))
    signal = level * envelope * np.sin(2 * np.pi * freq * (1 + 0.02 * rng.standard_normal()) * t)
    return (signal + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def make_dataset(
    root: Path, speakers_per_word: int = 12, words=tuple(WORD_TONES), suffix: str = ".wav"
) -> Path:
    """A small Speech Commands layout: word folders of tone 'words', lists and background noise.

    Speakers s00..s01 are listed for validation and s02 for testing; the rest are left to
    the speaker hash, which puts each speaker wholly in one split.
    """
    rng = np.random.default_rng(1)
    validation, testing = [], []
    for word in words:
        (root / word).mkdir(parents=True)
        for speaker in range(speakers_per_word):
            name = f"{speaker:02d}{word}ab_nohash_0"
            sf.write(root / word / f"{name}{suffix}", tone(WORD_TONES[word], seed=speaker), 16000)
            if speaker < 2:
                validation.append(f"{word}/{name}.wav")
            elif speaker == 2:
                testing.append(f"{word}/{name}.wav")
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    noise = root / "_background_noise_"
    noise.mkdir()
    sf.write(noise / "white_noise.wav", rng.uniform(-1, 1, 16000 * 20).astype(np.float32), 16000)
    sf.write(noise / "hum.wav", (0.2 * np.sin(np.arange(16000 * 10) * 0.05)).astype(np.float32), 16000)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "speech_commands")


@pytest.fixture
def negatives_dir(tmp_path) -> Path:
    """Continuous 'speech' without keywords in LibriSpeech layout: 5 speakers, 2 files each."""
    root = tmp_path / "negatives"
    for speaker in range(5):
        folder = root / str(100 + speaker) / "1"
        folder.mkdir(parents=True)
        for utt in range(2):
            t = np.arange(16000 * 4) / 16000
            signal = 0.2 * np.sin(2 * np.pi * (3100 + 100 * speaker) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
            sf.write(folder / f"{100 + speaker}-1-{utt:04d}.flac", signal.astype(np.float32), 16000)
    return root


TONE_WORDS = ["yes", "no", "up", "down"]


@pytest.fixture(scope="session")
def tone_dataset(tmp_path_factory) -> Path:
    """A synthetic data set big enough for a model to learn its tone 'words'."""
    return make_dataset(tmp_path_factory.mktemp("data") / "speech_commands", speakers_per_word=40)


def tone_run_config(dataset: Path, epochs: int):
    from kws.data import DataConfig
    from kws.model import ModelConfig
    from kws.train import RunConfig, TrainConfig

    # A few hundred steps only: fast BatchNorm averages and a higher learning rate.
    return RunConfig(
        data=DataConfig(str(dataset), words=TONE_WORDS),
        model=ModelConfig(batchnorm_momentum=0.8),
        train=TrainConfig(epochs=epochs, batch_size=16, learning_rates=(3e-3, 1e-3, 3e-4)),
    )


@pytest.fixture(scope="session")
def tone_run(tone_dataset, tmp_path_factory):
    """A run trained for 6 epochs on the tone data set: (run folder, metrics)."""
    from kws.train import train

    run = tmp_path_factory.mktemp("runs") / "tones"
    return run, train(tone_run_config(tone_dataset, epochs=6), run)


@pytest.fixture(scope="session")
def tone_export(tone_run, tmp_path_factory):
    """The tone run exported: (export folder, manifest). Any model-running test can use it."""
    from kws.export import export

    run, _ = tone_run
    out = tmp_path_factory.mktemp("export")
    return out, export(run, out)
