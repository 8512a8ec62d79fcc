"""Audio in: decode any file or bytes soundfile reads, mix to mono, resample to 16 kHz."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from kws.features import CLIP_SAMPLES, SAMPLE_RATE

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")


class AudioError(ValueError):
    """Audio that cannot be used; the message names the source and the reason."""


class TooLong(AudioError):
    """Audio over a duration limit, found from its header before a sample is decoded."""


def to_model_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """(frames,) or (frames, channels) at ``rate`` -> mono float32 at SAMPLE_RATE."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE and len(samples):
        samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32, copy=False)
    return samples


def _decode(source, name: str, max_seconds: float | None = None) -> np.ndarray:
    try:
        with sf.SoundFile(source) as file:
            if max_seconds is not None and file.frames > max_seconds * file.samplerate:
                seconds = file.frames / file.samplerate
                raise TooLong(f"{name}: {seconds:.1f} s of audio, over the {max_seconds:g} s limit")
            rate = file.samplerate
            samples = file.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as error:  # soundfile raises several types for undecodable input
        reason = getattr(error, "error_string", None) or str(error)  # libsndfile's own words
        raise AudioError(f"{name}: cannot decode audio ({reason})") from None
    if samples.size == 0:
        raise AudioError(f"{name}: holds no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: holds NaN or infinite samples")
    # Float formats can hold values far beyond full scale; a converter would clip them.
    samples = to_model_rate(np.clip(samples, -1.0, 1.0), rate)
    if not len(samples):
        raise AudioError(f"{name}: too short to hold a sample at {SAMPLE_RATE} Hz (its rate is {rate} Hz)")
    return samples


def load(path: str | Path) -> np.ndarray:
    """Read an audio file as mono float32 samples at SAMPLE_RATE; AudioError if unusable."""
    if not Path(path).is_file():
        raise AudioError(f"{path}: no such file")
    return _decode(str(path), str(path))


def decode(data: bytes, name: str = "audio", max_seconds: float | None = None) -> np.ndarray:
    """Decode audio file bytes (WAV, FLAC, OGG, ...) like ``load``; TooLong if the header says
    the recording lasts over ``max_seconds``."""
    if not data:
        raise AudioError(f"{name}: is empty")
    return _decode(io.BytesIO(data), name, max_seconds)


def fix_length(samples: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Pad with zeros at the end or trim the end to ``length`` samples (the reference recipe)."""
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


def is_audio_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")
