"""The frontend: constants, values against librosa, frame independence, streaming equality."""

import librosa
import numpy as np
import pytest

from kws import features as F


def test_constants_give_arms_49_by_10_features():
    assert (F.SAMPLE_RATE, F.WINDOW_SAMPLES, F.HOP_SAMPLES) == (16000, 640, 320)
    assert (F.NUM_FRAMES, F.NUM_MFCC) == (49, 10)
    assert F.mfcc(np.zeros(F.CLIP_SAMPLES)).shape == (49, 10)
    assert F.mfcc(np.zeros((3, 2, F.CLIP_SAMPLES))).shape == (3, 2, 49, 10)


def test_mel_matrix_equals_librosa():
    reference = librosa.filters.mel(sr=16000, n_fft=F.FFT_SIZE, n_mels=40, fmin=20, fmax=4000).T
    np.testing.assert_allclose(F.MEL_MATRIX, reference[: F.NUM_BINS], atol=1e-8)
    assert not reference[F.NUM_BINS :].any(), "no filter may reach above the bins we keep"


def librosa_mfcc(clip: np.ndarray) -> np.ndarray:
    """The documented formula, spelled with librosa calls."""
    # librosa centres a 640 window inside each 1024 frame: pad so its frames start where ours do.
    pad = (F.FFT_SIZE - F.WINDOW_SAMPLES) // 2
    padded = np.pad(clip, (pad, pad))
    power = (
        np.abs(
            librosa.stft(
                padded,
                n_fft=F.FFT_SIZE,
                hop_length=F.HOP_SAMPLES,
                win_length=F.WINDOW_SAMPLES,
                window="hann",
                center=False,
            )
        )
        ** 2
    )
    mel = librosa.feature.melspectrogram(S=power, sr=16000, n_fft=F.FFT_SIZE, n_mels=40, fmin=20, fmax=4000)
    return librosa.feature.mfcc(S=np.log(mel + F.LOG_FLOOR), n_mfcc=10, dct_type=2, norm="ortho").T


@pytest.mark.parametrize("level", [1e-3, 0.1, 0.9])
def test_mfcc_values_equal_librosa(level):
    rng = np.random.default_rng(0)
    t = np.arange(F.CLIP_SAMPLES) / F.SAMPLE_RATE
    clip = (level * (np.sin(2 * np.pi * 440 * t) + 0.3 * rng.standard_normal(len(t)))).astype(np.float32)
    clip = np.clip(clip, -1, 1)
    ours = F.mfcc(clip)
    reference = librosa_mfcc(clip)
    assert reference.shape == ours.shape == (49, 10)
    np.testing.assert_allclose(ours, reference, atol=2e-3 * np.abs(reference).max())


def test_digital_silence_sits_on_the_fixed_log_floor():
    frame = F.mfcc(np.zeros(F.CLIP_SAMPLES))[0]
    expected_c0 = np.log(F.LOG_FLOOR) * np.sqrt(F.NUM_MEL_BANDS)  # orthonormal DCT of a constant
    assert frame[0] == pytest.approx(expected_c0, rel=1e-5)
    np.testing.assert_allclose(frame[1:], 0, atol=1e-4)


def test_each_frame_depends_on_its_own_samples_only():
    rng = np.random.default_rng(1)
    quiet = (0.01 * rng.standard_normal(F.CLIP_SAMPLES)).astype(np.float32)
    loud_tail = quiet.copy()
    loud_tail[8000:] = 0.9 * np.sign(rng.standard_normal(8000))
    a, b = F.mfcc(quiet), F.mfcc(loud_tail)
    untouched = F.num_frames(8000)  # frames that end before sample 8000
    np.testing.assert_array_equal(a[:untouched], b[:untouched])
    assert np.abs(a[-1] - b[-1]).max() > 1.0


def test_frames_of_a_signal_are_the_frames_mfcc_computes():
    signal = (0.2 * np.random.default_rng(2).standard_normal(F.SAMPLE_RATE + 123)).astype(np.float32)
    count = F.num_frames(len(signal))
    view = F.frames(signal, count)
    assert view.shape == (count, F.WINDOW_SAMPLES) and not view.flags.writeable
    np.testing.assert_array_equal(view[-1], signal[(count - 1) * F.HOP_SAMPLES :][: F.WINDOW_SAMPLES])
    np.testing.assert_array_equal(F.frame_features(view), F.mfcc(signal))
    with pytest.raises(ValueError, match=f"{len(signal)} samples hold {count} frames, not {count + 1}"):
        F.frames(signal, count + 1)  # a view past the signal's end would read foreign memory


def test_silent_frames_get_the_silence_features_and_leave_the_others_alone():
    rng = np.random.default_rng(3)
    signal = (0.2 * rng.standard_normal(2 * F.SAMPLE_RATE)).astype(np.float32)
    signal[6000:15000] = 0  # a gap of digital silence, and silence to the end
    signal[24000:] = 0
    features = F.mfcc(signal)
    frames = F.frames(signal, len(features))
    silent = ~frames.any(axis=1)
    assert 60 > silent.sum() > 30
    np.testing.assert_array_equal(features[silent], np.tile(F.SILENCE_FRAME, (silent.sum(), 1)))
    one_by_one = np.concatenate([F.frame_features(frame[None]) for frame in frames])
    np.testing.assert_array_equal(features, one_by_one)
    assert F.SILENCE_FRAME[0] == pytest.approx(np.log(F.LOG_FLOOR) * np.sqrt(F.NUM_MEL_BANDS), rel=1e-5)
    # Only all-zero frames take the shortcut: the faintest sound is computed.
    faint = rng.uniform(-5e-5, 5e-5, F.SAMPLE_RATE).astype(np.float32)
    assert not (F.mfcc(faint) == F.SILENCE_FRAME).all(axis=1).any()


def test_too_short_audio_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 640 samples"):
        F.mfcc(np.zeros(100))


def test_check_compatible_names_the_difference():
    recorded = F.describe() | {"mel_fmax_hz": 7600.0}
    with pytest.raises(ValueError, match="mel_fmax_hz: 7600.0"):
        F.check_compatible(recorded, "runs/x")
    F.check_compatible(F.describe(), "runs/x")
    missing = {k: v for k, v in F.describe().items() if k != "num_mfcc"}  # a manifest of another kws
    with pytest.raises(ValueError, match="num_mfcc: None"):
        F.check_compatible(missing, "runs/x")
