"""The MFCC frontend: the one definition of features that training, streaming and devices share.

Every frame of features is computed from that frame's 640 samples alone, in this order
(a device port must copy it exactly; ``kws export`` generates the C tables from here):

1. ``x``: ``WINDOW_SAMPLES`` samples as float in [-1, 1) (int16 / 32768).
2. Multiply by a periodic Hann window ``w[n] = 0.5 - 0.5 cos(2 pi n / WINDOW_SAMPLES)``.
3. Zero-pad to ``FFT_SIZE`` and take the real FFT; power ``P[k] = re^2 + im^2`` for the
   bins ``k < NUM_BINS`` (the mel filters are zero above them).
4. Mel energies ``E = P @ MEL_MATRIX``: ``NUM_MEL_BANDS`` triangular filters between
   ``MEL_FMIN_HZ`` and ``MEL_FMAX_HZ`` on the Slaney mel scale with Slaney area
   normalisation (``librosa.filters.mel(htk=False, norm="slaney")``).
5. ``L = ln(E + LOG_FLOOR)``: a fixed floor, never relative to the clip's maximum, so
   a stream or a device gets the same values as a whole clip.
6. ``MFCC = L @ DCT_MATRIX``: orthonormal DCT-II, first ``NUM_MFCC`` coefficients.

A 1 s clip gives ``NUM_FRAMES`` x ``NUM_MFCC`` features (49 x 10), ARM's DS-CNN setting.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from kws import KwsError

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # one second: what the model sees
WINDOW_SAMPLES = 640  # 40 ms
HOP_SAMPLES = 320  # 20 ms
FFT_SIZE = 1024
NUM_MEL_BANDS = 40
MEL_FMIN_HZ = 20.0
MEL_FMAX_HZ = 4000.0
NUM_MFCC = 10
LOG_FLOOR = 1e-6
NUM_FRAMES = 1 + (CLIP_SAMPLES - WINDOW_SAMPLES) // HOP_SAMPLES  # 49


# Slaney's mel scale (librosa's htk=False): linear below 1 kHz, logarithmic above.
_HZ_PER_MEL = 200.0 / 3
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    log_part = _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP
    return np.where(hz >= _LOG_START_HZ, log_part, hz / _HZ_PER_MEL)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    log_part = _LOG_START_HZ * np.exp(_LOG_STEP * (mel - _LOG_START_MEL))
    return np.where(mel >= _LOG_START_MEL, log_part, _HZ_PER_MEL * mel)


def _mel_matrix() -> np.ndarray:
    """(FFT_SIZE // 2 + 1, NUM_MEL_BANDS) Slaney-normalised triangular filters.

    Written out with numpy instead of calling librosa so that serving never imports
    numba; tests check it equals ``librosa.filters.mel`` to float32 precision.
    """
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(MEL_FMIN_HZ), _hz_to_mel(MEL_FMAX_HZ), NUM_MEL_BANDS + 2))
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.T


WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW_SAMPLES) / WINDOW_SAMPLES)).astype(np.float32)
_FULL_MEL = _mel_matrix()
NUM_BINS = int(np.nonzero(_FULL_MEL.any(axis=1))[0][-1]) + 1
MEL_MATRIX = _FULL_MEL[:NUM_BINS].astype(np.float32)
DCT_MATRIX = scipy.fft.dct(np.eye(NUM_MEL_BANDS), type=2, norm="ortho", axis=-1)[:, :NUM_MFCC].astype(
    np.float32
)
# MEL_MATRIX's nonzero weights, filter after filter: each filter spans a few adjacent bins, so
# summing only those takes ~15 % less time than the dense product. Like einsum (and unlike
# BLAS matmul), it sums each frame in the same order however many frames come at once, so a
# stream gets identical features whether its audio arrives in one piece or many.
_MEL_BINS, _MEL_FILTERS = np.nonzero(MEL_MATRIX.T)[::-1]
_MEL_WEIGHTS = MEL_MATRIX[_MEL_BINS, _MEL_FILTERS]
_MEL_STARTS = np.searchsorted(_MEL_FILTERS, np.arange(NUM_MEL_BANDS))
assert len(np.unique(_MEL_FILTERS)) == NUM_MEL_BANDS, "a mel filter holds no FFT bin: widen the band"


def frame_features(frames: np.ndarray) -> np.ndarray:
    """MFCCs of frames: (..., WINDOW_SAMPLES) float samples -> (..., NUM_MFCC) float32."""
    frames = np.asarray(frames, dtype=np.float32)
    lead = frames.shape[:-1]
    flat = frames.reshape(-1, WINDOW_SAMPLES)
    # Frames of digital silence (the Detector's tail after a recording: 40 of the 90 frames
    # of a 1 s upload) skip the FFT: their features are a constant, bit for bit.
    sound = flat.any(axis=1)
    if not sound.all():
        features = np.empty((len(flat), NUM_MFCC), np.float32)
        features[:] = SILENCE_FRAME
        features[sound] = _sound_features(flat[sound])
        return features.reshape(*lead, NUM_MFCC)
    return _sound_features(flat).reshape(*lead, NUM_MFCC)


def _sound_features(flat: np.ndarray) -> np.ndarray:
    if len(flat) <= BLOCK_FRAMES:  # a live stream's few new frames
        return _block_features(flat)
    blocks = [
        _block_features(flat[start : start + BLOCK_FRAMES]) for start in range(0, len(flat), BLOCK_FRAMES)
    ]
    return np.concatenate(blocks)


# Frames go through the FFT this many at a time: a block's buffers stay in the CPU's cache
# (a second of audio, 90 frames with the Detector's tail, costs 1.3 x as much per frame at once).
BLOCK_FRAMES = 32


def _block_features(frames: np.ndarray) -> np.ndarray:
    windowed = frames * WINDOW
    spectrum = scipy.fft.rfft(windowed, n=FFT_SIZE, axis=-1)[:, :NUM_BINS]  # zero-padded to FFT_SIZE
    power = np.abs(spectrum) ** 2  # three times faster than re**2 + im**2 on a strided view
    mel = np.add.reduceat(power[:, _MEL_BINS] * _MEL_WEIGHTS, _MEL_STARTS, axis=1)
    # einsum for the same reason as the mel sums: the same order for every frame.
    return np.einsum("nk,km->nm", np.log(mel + np.float32(LOG_FLOOR)), DCT_MATRIX)


SILENCE_FRAME = _block_features(np.zeros((1, WINDOW_SAMPLES), np.float32))[0]  # all-zero samples


def num_frames(num_samples: int) -> int:
    """How many whole frames ``num_samples`` samples hold."""
    if num_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - WINDOW_SAMPLES) // HOP_SAMPLES


def frames(signal: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` frames of a 1-D float32 signal: a read-only (count, WINDOW_SAMPLES) view.

    A strided view rather than ``sliding_window_view`` (which ``mfcc`` uses for batches): the
    Detector takes a few frames every hop, and this costs a third as much.
    """
    if count > num_frames(len(signal)):  # as_strided would read past the signal's memory
        raise ValueError(f"{len(signal)} samples hold {num_frames(len(signal))} frames, not {count}")
    step = signal.strides[0]
    return np.lib.stride_tricks.as_strided(
        signal, (count, WINDOW_SAMPLES), (HOP_SAMPLES * step, step), writeable=False
    )


def mfcc(audio: np.ndarray) -> np.ndarray:
    """Features of clips: (..., samples) at SAMPLE_RATE -> (..., frames, NUM_MFCC) float32.

    A 1 s clip (CLIP_SAMPLES) gives (NUM_FRAMES, NUM_MFCC); batches keep their leading axes.
    """
    audio = np.asarray(audio, dtype=np.float32)
    count = num_frames(audio.shape[-1])
    if count == 0:
        raise ValueError(f"need at least {WINDOW_SAMPLES} samples for one frame, got {audio.shape[-1]}")
    windows = np.lib.stride_tricks.sliding_window_view(audio, WINDOW_SAMPLES, axis=-1)
    return frame_features(windows[..., ::HOP_SAMPLES, :][..., :count, :])


def describe() -> dict:
    """The frontend's constants, recorded beside every model so a device can reproduce them."""
    return {
        "sample_rate": SAMPLE_RATE,
        "clip_samples": CLIP_SAMPLES,
        "window_samples": WINDOW_SAMPLES,
        "hop_samples": HOP_SAMPLES,
        "fft_size": FFT_SIZE,
        "window": "hann (periodic)",
        "spectrum": "power",
        "mel_bands": NUM_MEL_BANDS,
        "mel_fmin_hz": MEL_FMIN_HZ,
        "mel_fmax_hz": MEL_FMAX_HZ,
        "mel_scale": "slaney, slaney-normalised filters",
        "log": f"ln(mel + {LOG_FLOOR})",
        "dct": "type II, orthonormal",
        "num_mfcc": NUM_MFCC,
        "num_frames": NUM_FRAMES,
    }


class FrontendError(KwsError, ValueError):
    """A model made for a different frontend than this kws computes."""


def check_compatible(recorded: dict, source: str) -> None:
    """Refuse a model whose recorded frontend differs from this one: its scores would be wrong."""
    current = describe()
    differences = [
        f"{k}: {recorded.get(k)!r} (this kws: {v!r})" for k, v in current.items() if recorded.get(k) != v
    ]
    if differences:
        raise FrontendError(
            f"{source} was trained with a different frontend than this version of kws computes: "
            + "; ".join(differences)
            + ". Retrain it, or use the kws version it was trained with."
        )
