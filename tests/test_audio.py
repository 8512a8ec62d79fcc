"""Decoding: formats, rates, channels, length fixing and unusable files."""

import io

import numpy as np
import pytest
import soundfile as sf

from kws import audio
from kws.features import SAMPLE_RATE


def sine(freq, rate, seconds=1.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def peak_hz(samples, rate=16000):
    spectrum = np.abs(np.fft.rfft(samples))
    return np.argmax(spectrum) * rate / len(samples)


@pytest.mark.parametrize(
    "suffix,subtype",
    [(".wav", "PCM_16"), (".wav", "PCM_24"), (".wav", "FLOAT"), (".flac", "PCM_16"), (".ogg", "VORBIS")],
)
def test_formats_decode_to_the_same_tone(tmp_path, suffix, subtype):
    path = tmp_path / f"tone{suffix}"
    sf.write(path, sine(1000, 16000), 16000, subtype=subtype)
    samples = audio.load(path)
    assert samples.dtype == np.float32
    assert abs(len(samples) - 16000) <= 64
    assert peak_hz(samples) == pytest.approx(1000, abs=2)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_rate_is_resampled_to_16k_keeping_pitch(tmp_path, rate):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(1000, rate), rate)
    samples = audio.load(path)
    assert len(samples) == pytest.approx(16000, abs=2)
    assert peak_hz(samples) == pytest.approx(1000, abs=2)


def test_stereo_and_six_channels_are_mixed_down(tmp_path):
    left = sine(500, 16000)
    stereo = np.stack([left, -left], axis=1)  # opposite phases cancel in the mix
    sf.write(tmp_path / "stereo.wav", stereo, 16000)
    assert np.abs(audio.load(tmp_path / "stereo.wav")).max() < 1e-4
    sf.write(tmp_path / "six.wav", sine(500, 16000, channels=6), 16000)
    six = audio.load(tmp_path / "six.wav")
    assert six.ndim == 1 and np.abs(six).max() == pytest.approx(0.5, abs=1e-3)


def test_fix_length_pads_at_the_end_and_trims_the_end():
    short = np.ones(10000, np.float32)
    padded = audio.fix_length(short)
    assert len(padded) == 16000 and padded[:10000].all() and not padded[10000:].any()
    trimmed = audio.fix_length(np.arange(20000, dtype=np.float32))
    np.testing.assert_array_equal(trimmed, np.arange(16000))


def test_unusable_files_raise_audio_error_naming_the_file(tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(audio.AudioError, match="broken.wav: cannot decode"):
        audio.load(broken)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(audio.AudioError, match="empty.wav: holds no audio"):
        audio.load(empty)
    with pytest.raises(audio.AudioError, match="is empty"):
        audio.decode(b"")
    (tmp_path / "nothing.wav").touch()  # a recording that never started: not a format problem
    with pytest.raises(audio.AudioError, match=r"nothing.wav: an empty file \(0 bytes\)$"):
        audio.load(tmp_path / "nothing.wav")
    low = tmp_path / "low.wav"
    sf.write(low, sine(500, 4000), 4000)
    with pytest.raises(audio.AudioError, match="low.wav: recorded at 4000 Hz, under the 8000 Hz"):
        audio.load(low)
    with pytest.raises(audio.AudioError, match="recorded at 4000 Hz"):  # what kws listen --file plays
        next(audio.NativeAudio(low).blocks(512))
    sf.write(tmp_path / "top.wav", sine(500, 768_000, seconds=0.01), 768_000)  # the highest rate sold
    assert len(audio.load(tmp_path / "top.wav")) == 160
    high = tmp_path / "high.wav"
    sf.write(high, sine(500, 768_000, seconds=0.01), 768_001)
    with pytest.raises(audio.AudioError, match="high.wav: its header says 768,001 Hz, over the 768,000 Hz"):
        audio.load(high)
    with pytest.raises(audio.AudioError, match="768,001 Hz"):
        audio.NativeAudio(high)
    memo = tmp_path / "memo.m4a"  # a phone's voice memo: AAC in an MP4 container
    memo.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    with pytest.raises(audio.AudioError) as refused:
        audio.load(memo)
    assert str(refused.value).endswith(f"(Format not recognised.): {audio.CONVERT}")


def test_formats_and_channel_counts_kws_does_not_read_are_refused_before_decoding(tmp_path, capfd):
    sample_dump = tmp_path / "loop.sds"  # a MIDI sample dump: libsndfile reads it, kws does not
    sf.write(sample_dump, sine(440, 16000), 16000, format="SDS", subtype="PCM_16")
    with pytest.raises(audio.AudioError) as refused:
        audio.decode(sample_dump.read_bytes(), "upload")
    assert str(refused.value) == f"upload: SDS (Midi Sample Dump Standard) audio: {audio.CONVERT}"
    with pytest.raises(audio.AudioError, match="loop.sds: SDS"):
        audio.duration(sample_dump)  # what kws detect reads first
    many = tmp_path / "many.wav"
    sf.write(many, np.zeros((100, audio.MAX_CHANNELS + 1), np.float32), 16000)
    with pytest.raises(audio.AudioError) as refused:
        audio.load(many)
    assert str(refused.value) == f"{many}: 65 channels, over the 64 kws mixes: mix it down first"
    assert capfd.readouterr().out == ""


def test_an_mp3_cut_before_its_first_frame_is_not_called_a_missing_file(tmp_path):
    path = tmp_path / "tone.mp3"
    sf.write(path, sine(440, 16000), 16000, format="MP3")
    with pytest.raises(audio.AudioError) as refused:
        audio.decode(path.read_bytes()[:200], "upload")
    assert str(refused.value) == "upload: cannot decode audio (too short or damaged to find audio in)"


def test_non_finite_samples_are_refused(tmp_path):
    path = tmp_path / "nan.wav"
    data = sine(440, 16000)
    data[100] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="NaN"):
        audio.decode(path.read_bytes(), "upload")


def test_float_samples_beyond_full_scale_are_clipped_as_a_converter_would(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, 1000 * sine(440, 16000), 16000, subtype="FLOAT")  # floats hold any value
    for samples in (audio.load(path), np.concatenate(list(audio.NativeAudio(path).blocks(800)))):
        assert samples.min() == -1.0 and samples.max() == 1.0


def test_a_duration_limit_refuses_long_audio_from_its_header():
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(3 * 8000, np.float32), 8000, format="WAV")
    with pytest.raises(audio.TooLong, match=r"clip.wav: 3.0 s of audio, over the 2 s limit"):
        audio.decode(buffer.getvalue(), "clip.wav", max_seconds=2)
    assert len(audio.decode(buffer.getvalue(), "clip.wav", max_seconds=3)) == 3 * 16000


def test_a_duration_limit_also_bounds_the_samples_of_many_channels_at_high_rates():
    # Compressed silence at a high rate and many channels is small to send and huge to decode.
    def flac(rate, channels):
        buffer = io.BytesIO()
        sf.write(buffer, np.zeros((int(0.4 * rate), channels), np.int16), rate, format="FLAC")
        return buffer.getvalue()

    message = r"x.flac: 8 channels at 192000 Hz for 0.4 s, more samples than 0.5 s of stereo at 192 kHz"
    with pytest.raises(audio.TooLong, match=message):
        audio.decode(flac(192_000, 8), "x.flac", max_seconds=0.5)
    assert len(audio.decode(flac(192_000, 2), "x.flac", max_seconds=0.5)) == 0.4 * 16000


def test_a_flac_header_without_a_length_is_a_clear_error():
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16000, np.int16), 16000, format="FLAC")
    data = bytearray(buffer.getvalue())
    # STREAMINFO's total sample count (the low 36 bits at bytes 18-25) is 0 from a pipe.
    fields = int.from_bytes(data[18:26], "big")
    data[18:26] = (fields >> 36 << 36).to_bytes(8, "big")
    with pytest.raises(audio.AudioError, match="piped.flac: its header gives no length"):
        audio.decode(bytes(data), "piped.flac", max_seconds=60)


def test_decoding_holds_a_bounded_number_of_samples_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "six.flac"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (48_000 * 3, 6)), 48_000)
    whole = audio.load(path)
    read, decode = [], sf.SoundFile.read

    def counted(self, *args, **kwargs):
        piece = decode(self, *args, **kwargs)
        read.append(piece.size)
        return piece

    monkeypatch.setattr(sf.SoundFile, "read", counted)
    monkeypatch.setattr(audio, "BLOCK_VALUES", 60_000)
    np.testing.assert_array_equal(audio.decode(path.read_bytes(), "six.flac", max_seconds=60), whole)
    # 144,000 frames of 6 channels, 10,000 at a time, and the empty read that says the end came
    assert read == [60_000] * 14 + [24_000, 0]


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2), (8000, 6)])
def test_blocks_join_up_to_the_whole_file(tmp_path, rate, channels):
    path = tmp_path / "long.flac"
    noise = np.random.default_rng(rate).uniform(-0.5, 0.5, (int(rate * 2.3), channels))
    sf.write(path, noise, rate)
    pieces = list(audio.blocks(path, seconds=0.25))
    assert len(pieces) >= 9 and all(piece.dtype == np.float32 for piece in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), audio.load(path))
    assert audio.duration(path) == len(noise) / rate


def test_blocks_refuse_bad_audio_where_they_find_it(tmp_path):
    path = tmp_path / "nan.wav"
    data = sine(440, 16000, seconds=2.0)
    data[20000] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    pieces = audio.blocks(path, seconds=0.5)
    assert len(next(pieces)) == 8000  # the first half second is usable
    with pytest.raises(audio.AudioError, match="nan.wav: holds NaN"):
        list(pieces)
    played = []  # as listen --file plays it, 50 ms at a time: up to the block holding the NaN
    with pytest.raises(audio.AudioError, match="nan.wav: holds NaN"):
        played.extend(audio.NativeAudio(path).blocks(800))
    assert len(played) == 20000 // 800
    with pytest.raises(audio.AudioError, match="missing.wav: no such file"):
        audio.blocks(tmp_path / "missing.wav")
    with pytest.raises(audio.AudioError, match="/dev/null: not a regular file"):
        audio.load("/dev/null")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(audio.AudioError, match="text.wav: cannot decode"):
        audio.duration(tmp_path / "text.wav")


def test_a_truncated_mp3_gives_the_audio_it_holds_and_never_repeats_it(tmp_path):
    t = np.arange(SAMPLE_RATE * 24) / SAMPLE_RATE
    sweep = (0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t)).astype(np.float32)  # no two seconds alike
    sf.write(tmp_path / "whole.mp3", sweep, SAMPLE_RATE, format="MP3")
    whole = (tmp_path / "whole.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(whole[: len(whole) // 2])  # a download that stopped halfway
    samples = audio.load(tmp_path / "cut.mp3")
    assert 10 * SAMPLE_RATE < len(samples) < 14 * SAMPLE_RATE
    second = SAMPLE_RATE
    assert np.abs(samples[-second:] - samples[-11 * second : -10 * second]).max() > 0.1  # not played twice
    assert sum(len(block) for block in audio.NativeAudio(tmp_path / "cut.mp3").blocks(800)) == len(samples)
