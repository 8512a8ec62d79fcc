"""Data: layouts, splits, shares, negatives, noise levels, augmentation, bad files."""

import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import make_dataset, tone

from kws import data as D
from kws.features import (
    CLIP_SAMPLES,
    FFT_SIZE,
    MEL_MATRIX,
    NUM_FRAMES,
    NUM_MEL_BANDS,
    NUM_MFCC,
    SAMPLE_RATE,
    mfcc,
)


def config(root, **kw):
    return D.DataConfig(data_dir=str(root), words=kw.pop("words", ["yes", "no", "up", "down"]), **kw)


@pytest.mark.parametrize(
    "name,split",
    [
        ("6d818f6c_nohash_2.wav", "validation"),  # named in the official validation_list.txt
        ("099d52ad_nohash_2.wav", "validation"),
        ("004ae714_nohash_1.wav", "training"),  # an official training clip
    ],
)
def test_speaker_hash_reproduces_official_assignments(name, split):
    assert D.which_set(D.speaker_id(Path("yes") / name), 10, 10) == split


def test_speaker_hash_keeps_a_speaker_in_one_split_with_the_10_10_80_shares():
    names = [Path(f"w/{i:08x}_nohash_{k}.wav") for i in range(3000) for k in range(2)]
    splits = [D.which_set(D.speaker_id(n), 10, 10) for n in names]
    assert all(splits[2 * i] == splits[2 * i + 1] for i in range(3000))
    shares = {s: splits.count(s) / len(splits) for s in D.SPLITS}
    assert shares["validation"] == pytest.approx(0.1, abs=0.02)
    assert shares["testing"] == pytest.approx(0.1, abs=0.02)


def test_speaker_ids_of_both_corpora_and_plain_files():
    assert D.speaker_id(Path("yes/0a7c2a8d_nohash_3.wav")) == "0a7c2a8d"
    assert D.speaker_id(Path("19/198/19-198-0001.flac")) == "19"
    assert D.speaker_id(Path("kitchen.wav")) == "kitchen"


def test_scan_uses_lists_then_hash_and_matches_flac_copies_of_wav_lists(tmp_path):
    root = make_dataset(tmp_path / "sc", suffix=".flac")  # lists still name .wav files
    clips = D.scan(root)
    by_name = {c.path.name: c for c in clips}
    assert by_name["00yesab_nohash_0.flac"].split == "validation"
    assert by_name["02noab_nohash_0.flac"].split == "testing"
    for clip in clips:
        if int(clip.path.name[:2]) >= 3:
            assert clip.split == D.which_set(D.speaker_id(clip.path), 10, 10)
    assert {c.word for c in clips} == {"yes", "no", "up", "down", "bed", "cat"}


def test_test_package_layout_maps_folders_to_labels(tmp_path):
    root = tmp_path / "package"
    for folder, freq in [("yes", 400), ("_silence_", 0), ("_unknown_", 1900), ("on", 700)]:
        (root / folder).mkdir(parents=True)
        for i in range(3):
            sf.write(
                root / folder / f"{i:08x}_nohash_0.wav", tone(freq or 1, level=0.3 if freq else 0), 16000
            )
    data = D.SpeechData(config(root, words=["yes", "no"]))
    assert data.package and all(c.split == "testing" for c in data.clips)
    examples = data.evaluation_set("testing")
    counts = {label: int((examples.labels == i).sum()) for i, label in enumerate(data.labels)}
    assert counts == {"_silence_": 3, "_unknown_": 6, "yes": 3, "no": 0}  # "on" is unknown to this model
    with pytest.raises(D.DataError, match="test set package"):
        data.evaluation_set("validation")


def test_training_epoch_has_the_silence_and_unknown_shares_and_changes_each_epoch(tiny_dataset):
    data = D.SpeechData(config(tiny_dataset, silence_share=0.1, unknown_share=0.2))
    x1, y1 = data.training_epoch(np.random.default_rng(0), D.AugmentConfig())
    x2, _ = data.training_epoch(np.random.default_rng(1), D.AugmentConfig())
    assert x1.shape[1:] == (NUM_FRAMES, NUM_MFCC) and x1.dtype == np.float32
    shares = np.bincount(y1, minlength=len(data.labels)) / len(y1)
    assert shares[0] == pytest.approx(0.1, abs=0.02)
    assert shares[1] == pytest.approx(0.2, abs=0.02)
    assert {row.tobytes() for row in x1}.isdisjoint(row.tobytes() for row in x2)  # drawn anew, not reshuffled


def test_silence_spans_near_silence_to_the_noise_files_own_level(tiny_dataset):
    bank = D.NoiseBank(tiny_dataset / "_background_noise_", held_out_share=0.2)
    peaks = np.abs(bank.silence(np.random.default_rng(0), 500, "training")).max(axis=1)
    assert peaks.min() < 1e-3
    assert peaks.max() > 0.5  # white noise at full scale stays loud
    assert np.mean(peaks > 0.1) > 0.1


def test_noise_and_negatives_hold_out_their_own_parts(tiny_dataset, negatives_dir):
    (tiny_dataset / "_background_noise_" / "fan.wav").write_bytes(b"not audio")  # named, and skipped
    bank = D.NoiseBank(tiny_dataset / "_background_noise_", held_out_share=0.25)
    assert bank.names == ["hum.wav", "white_noise.wav"] and len(bank.parts["training"]) == 2
    for train, held in zip(bank.parts["training"], bank.parts["held_out"], strict=True):
        assert len(held) == pytest.approx(len(train) / 3, rel=0.01)
    negatives = D.NegativeBank([str(negatives_dir)], validation_share=0.2)
    assert len(negatives.speakers["held_out"]) == 1 and len(negatives.speakers["training"]) == 4
    assert not set(negatives.speakers["held_out"]) & set(negatives.speakers["training"])
    assert negatives.seconds("held_out") == pytest.approx(8.0)
    for speaker in ("102", "103", "104"):  # two speakers: a fifth of them rounds to none, yet one is held out
        shutil.rmtree(negatives_dir / speaker)
    two = D.NegativeBank([str(negatives_dir)], validation_share=0.2).speakers
    assert len(two["held_out"]) == 1 and len(two["training"]) == 1


def test_evaluation_set_is_fixed_and_fills_unknown_with_held_out_negatives(tiny_dataset, negatives_dir):
    cfg = config(tiny_dataset, negatives=[str(negatives_dir)])
    a = D.SpeechData(cfg).evaluation_set("validation")
    b = D.SpeechData(cfg).evaluation_set("validation")
    np.testing.assert_array_equal(a.audio, b.audio)
    assert a.audio.shape[1] == CLIP_SAMPLES
    keywords = int((a.sources == "keyword").sum())
    held_out = [c for c in D.scan(tiny_dataset) if c.split == "validation"]
    assert keywords == sum(c.word in cfg.words for c in held_out) >= 8  # 2 listed speakers x 4 words
    unknown = a.labels == 1
    assert set(a.sources[unknown]) == {"other word", "negative speech"}
    # the 10 % share; at most half (negatives_fraction) from the held-out other-word clips, each once
    n_unknown = int(np.ceil(keywords / 0.8 * 0.1))
    assert unknown.sum() == (a.labels == 0).sum() == n_unknown
    other_words = sum(c.word in ("bed", "cat") for c in held_out)
    assert (a.sources == "other word").sum() == min(other_words, n_unknown - round(n_unknown * 0.5))
    assert set(a.words[a.sources == "other word"]) <= {"bed", "cat"}
    assert set(a.words[a.sources == "keyword"]) == set(cfg.words)
    assert set(a.words[(a.sources == "noise") | (a.sources == "negative speech")]) == {""}


def test_a_corrupt_clip_is_reported_and_skipped(tiny_dataset, capsys):
    bad = tiny_dataset / "yes" / "99yesab_nohash_0.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    samples, kept = D.load_clips([bad, tiny_dataset / "no" / "05noab_nohash_0.wav"], "test")
    assert kept == [1] and samples.shape == (1, CLIP_SAMPLES)
    assert "99yesab_nohash_0.wav: cannot decode" in capsys.readouterr().err


def test_time_shift_moves_audio_by_at_most_the_limit():
    batch = np.zeros((200, 1000), np.float32)
    batch[:, 500] = 1.0
    shifted = D.time_shift(batch, np.random.default_rng(0), 100)
    positions = shifted.argmax(axis=1)
    assert positions.min() >= 400 and positions.max() <= 600
    assert len(set(positions)) > 50
    assert (shifted.sum(axis=1) == 1).all()


def test_list_lines_naming_no_clip_and_clips_over_a_second_are_reported(tiny_dataset, capsys):
    listed = (tiny_dataset / "validation_list.txt").read_text().splitlines()
    (tiny_dataset / "validation_list.txt").write_text(
        "\n".join([f"./{listed[0]}", *listed[1:], "yes/not_here.wav", "music/x.wav"])
    )
    sf.write(tiny_dataset / "yes" / "30yesab_nohash_0.wav", tone(400.0, seconds=3.0), 16000)
    clips = D.scan(tiny_dataset)
    err = capsys.readouterr().err
    assert "name no clip there: 2 of" in err and "(yes/not_here.wav, music/x.wav); a line is" in err
    assert "letter case" not in err
    (tiny_dataset / "validation_list.txt").write_text(f"{listed[0].upper()}\n")
    D.scan(tiny_dataset)
    assert (
        f"({listed[0].upper()}); a line is WORD/PATH, the clip's path below {tiny_dataset}, and letter case "
        f"counts: {listed[0].upper()} is {listed[0]} there"
    ) in capsys.readouterr().err
    (tiny_dataset / "validation_list.txt").write_text("\n".join(listed))
    validation = {f"{clip.word}/{clip.path.name}" for clip in clips if clip.split == "validation"}
    assert listed[0] in validation and set(listed) <= validation  # "./" before a line is the same path
    D.load_clips([clip.path for clip in clips if clip.word == "yes"], "training clips")
    err = capsys.readouterr().err
    assert (
        "warning: training clips over 1 s long: 1 (the first:" in err and "30yesab_nohash_0.wav, 3.0 s" in err
    )


def test_clips_with_no_sound_are_warned_of_and_kept(tmp_path, capsys):
    quiet = 10 ** (-54 / 20) * np.sin(np.arange(16000) * 0.2)  # a whisper peaking at -54 dBFS: a word
    for name, samples in (("empty", np.zeros(16000)), ("muted", quiet / 100), ("whisper", quiet)):
        sf.write(tmp_path / f"{name}.wav", samples.astype(np.float32), 16000, subtype="PCM_16")
    (tmp_path / "_silence_").mkdir()  # the test package's silence: none is meant to be there
    sf.write(tmp_path / "_silence_" / "quiet.wav", np.zeros(16000, np.float32), 16000)
    paths = [*sorted(tmp_path.glob("*.wav")), tmp_path / "_silence_" / "quiet.wav"]
    clips, kept = D.load_clips(paths, "training clips")
    assert kept == [0, 1, 2, 3]
    assert (
        "warning: training clips with no sound in them (peaks under -60 dBFS): 2 (the first: "
        f"{tmp_path / 'empty.wav'}); an empty take or a muted microphone labels silence as a word"
    ) in capsys.readouterr().err


def test_a_take_longer_than_a_second_gives_the_second_centred_on_its_word(tmp_path):
    take = np.zeros(3 * 16000, np.float32)  # as a phone records it: silence, the word, silence
    take[24000:32000] = 0.5 * tone(400.0, seconds=0.5)
    sf.write(tmp_path / "take01.wav", take, 16000)
    sf.write(tmp_path / "short.wav", take[24000:32000], 16000)  # a clip under 1 s: padded at its end
    clips, kept = D.load_clips([tmp_path / "take01.wav", tmp_path / "short.wav"], "training clips")
    assert kept == [0, 1] and clips.shape == (2, 16000)
    sounding = np.flatnonzero(clips[0])
    assert abs(sounding[0] - 4000) <= 2 and abs(sounding[-1] - 11999) <= 2  # 0.25 s either side
    assert np.flatnonzero(clips[1])[[0, -1]].tolist() == [0, 7999]


def test_split_lists_are_read_as_utf8_with_or_without_a_byte_order_mark(tiny_dataset):
    lists = tiny_dataset / "validation_list.txt"
    listed = lists.read_text()
    before = {clip.path: clip.split for clip in D.scan(tiny_dataset)}
    lists.write_text(listed, encoding="utf-8-sig")  # as Windows editors save it
    assert {clip.path: clip.split for clip in D.scan(tiny_dataset)} == before
    lists.write_text(listed, encoding="utf-16")
    with pytest.raises(D.DataError, match="validation_list.txt is not UTF-8 text: save it as UTF-8"):
        D.scan(tiny_dataset)


def test_a_list_line_matches_its_clip_whether_names_are_composed_or_decomposed(tiny_dataset, capsys):
    decomposed, composed = (unicodedata.normalize(form, "café") for form in ("NFD", "NFC"))
    (tiny_dataset / "yes").rename(tiny_dataset / decomposed)  # as macOS writes file names
    (tiny_dataset / "validation_list.txt").write_text("")
    training = [clip.path for clip in D.scan(tiny_dataset) if clip.split == "training"]
    name = next(path.name for path in training if path.parent.name == decomposed)
    (tiny_dataset / "validation_list.txt").write_text(f"{composed}/{name}\n")  # as an editor writes it
    (clip,) = [clip for clip in D.scan(tiny_dataset) if clip.path.name == name]
    assert (
        clip.split == "validation" and "validation_list.txt that name no clip" not in capsys.readouterr().err
    )


def test_negatives_that_give_no_speech_are_refused_or_named(tiny_dataset, negatives_dir, capsys):
    kept = D.NegativeBank([str(negatives_dir)], validation_share=0.2).speakers["training"][0]
    broken = sorted(negatives_dir.rglob("*.flac"), key=lambda path: D.speaker_id(path) == kept)
    for path in broken[:-2]:  # one training speaker left that can be read: none held out
        path.write_text("not audio")
    cfg = config(tiny_dataset, negatives=[str(negatives_dir)])
    examples = D.SpeechData(cfg).evaluation_set("validation")
    assert "leaves no speech for validation" in capsys.readouterr().err
    assert "negative speech" not in set(examples.sources)  # not windows of silence called speech
    for path in broken[-2:]:
        path.write_text("not audio")
    with pytest.raises(D.DataError, match="none of its 10 audio files could be read"):
        D.SpeechData(cfg).evaluation_set("validation")


def test_files_and_folders_without_read_permission_are_named_as_such(tmp_path, monkeypatch):
    # As a user who is not root: root reads any file whatever its mode.
    monkeypatch.setattr(os, "access", lambda path, mode: os.stat(path).st_mode & 0o777 != 0)
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise" / "hum.wav", tone(50.0), 16000)
    (tmp_path / "noise" / "hum.wav").chmod(0)
    with pytest.raises(
        D.audio.AudioError, match="hum.wav: no permission to read it; check its owner and mode"
    ):
        D.audio.load(tmp_path / "noise" / "hum.wav")
    (tmp_path / "noise").chmod(0)
    try:
        with pytest.raises(D.DataError, match="noise: no permission to read the folder"):
            D.NoiseBank(tmp_path / "noise", held_out_share=0.2)
    finally:
        (tmp_path / "noise").chmod(0o755)


def test_a_noise_recording_too_short_to_split_gives_silent_windows_not_a_crash(tmp_path):
    sf.write(tmp_path / "tick.wav", np.full(1, 0.5, np.float32), 16000)
    noise = D.NoiseBank(tmp_path, held_out_share=0.2)
    windows = noise.windows(np.random.default_rng(0), 3, "training")  # its training part is empty
    assert windows.shape == (3, CLIP_SAMPLES) and not windows.any()


def test_the_summary_counts_the_clips_that_could_be_read(tiny_dataset):
    data = D.SpeechData(config(tiny_dataset))
    scanned = sum(c.word == "yes" and c.split == "training" for c in data.clips)
    broken = next(c.path for c in data.clips if c.word == "yes" and c.split == "training")
    broken.write_text("not audio")
    data.split_audio("training")
    counts = data.summary()["clips_per_split"]
    assert counts["training"]["yes"] == scanned - 1
    tests = sum(c.split == "testing" for c in data.clips)
    assert sum(counts["testing"].values()) == tests > 0  # not read: what the folders hold


def test_negatives_given_as_a_file_or_as_the_noise_folder_are_refused(tiny_dataset, tmp_path):
    clip = tmp_path / "speech.flac"
    sf.write(clip, tone(300.0), 16000)
    with pytest.raises(D.DataError, match=f"--negatives {clip} is a file: pass the folder that holds it"):
        D.check_folders(config(tiny_dataset, negatives=[str(clip)]))
    noise = tiny_dataset / "_background_noise_"  # it would train as _silence_ and as _unknown_
    with pytest.raises(
        D.DataError, match=f"--negatives {noise} is background noise: --negatives wants speech"
    ):
        D.check_folders(config(tiny_dataset, negatives=[str(noise)]))


def test_spec_augment_zeroes_bands_and_keeps_shape():
    feats = np.ones((50, NUM_FRAMES, NUM_MFCC), np.float32)
    masked = D.spec_augment(feats, np.random.default_rng(0), D.AugmentConfig(spec_augment=True))
    assert masked.shape == feats.shape and feats.all()
    zero_frames = (masked == 0).all(axis=2).sum(axis=1)
    zero_coefficients = (masked == 0).all(axis=1).sum(axis=1)
    assert zero_frames.max() <= 10 and zero_coefficients.max() <= 4
    assert zero_frames.mean() > 1 and zero_coefficients.mean() > 0.5


def test_channel_response_is_what_a_microphone_with_that_response_gives():
    # A microphone whose gain over the bands is a 6 dB cosine shaped like MFCC 2's, applied
    # to the spectrum of noise, moves MFCC 2 by what channel_response adds for 6 dB, and no
    # other coefficient by much.
    noise = np.random.default_rng(0).standard_normal(CLIP_SAMPLES).astype(np.float32) * 0.1
    centers_hz = MEL_MATRIX.argmax(axis=0) * SAMPLE_RATE / FFT_SIZE
    fft_hz = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    band = np.interp(fft_hz, centers_hz, np.arange(NUM_MEL_BANDS))
    gain_db = 6.0 * np.cos(np.pi * 2 * (band + 0.5) / NUM_MEL_BANDS)
    heard = np.fft.irfft(np.fft.rfft(noise) * 10 ** (gain_db / 20), CLIP_SAMPLES).astype(np.float32)
    moved = (mfcc(heard) - mfcc(noise))[2:-2].mean(axis=0)  # the edge frames see the filter wrap
    expected = 6.0 * np.log(10) / 10 / np.sqrt(2 / NUM_MEL_BANDS)
    assert moved[2] == pytest.approx(expected, rel=0.1)
    assert np.abs(np.delete(moved, 2)).max() < 0.1 * expected
    # channel_response: that offset on MFCC 1-3 alone, the same in every frame, 6 dB apart on average
    feats = np.random.default_rng(1).normal(size=(4000, NUM_FRAMES, NUM_MFCC)).astype(np.float32)
    offsets = D.channel_response(feats, np.random.default_rng(2), 6.0) - feats
    assert np.allclose(offsets, offsets[:, :1], atol=1e-5)
    assert np.abs(offsets[:, :, [0, *range(1 + D.CHANNEL_SHAPES, NUM_MFCC)]]).max() == 0
    assert offsets[:, 0, 1 : 1 + D.CHANNEL_SHAPES].std(axis=0) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="channel_db must be 0 or more"):
        D.AugmentConfig(channel_db=-1.0)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"silence_share": 0.6, "unknown_share": 0.5}, "below 1"),
        ({"words": ["yes", "yes"]}, "without repeats"),
        ({"words": ["_silence_"]}, "reserved"),
    ],
)
def test_bad_data_settings_are_refused(tiny_dataset, kw, message):
    with pytest.raises(D.DataError, match=message):
        config(tiny_dataset, **kw)


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(D.DataError, match="kws download"):
        D.scan(tmp_path / "nowhere")


def test_speech_extent_finds_the_loud_part():
    clip = np.zeros((1, CLIP_SAMPLES), np.int16)
    clip[0, 6400:9600] = 10000
    first, last = D.speech_extent(clip)
    assert (first[0], last[0]) == (6400, 9600)


def test_partial_words_keep_only_part_of_a_keyword_and_are_unknown(tiny_dataset):
    data = D.SpeechData(config(tiny_dataset, partial_fraction=0.5, unknown_share=0.4))
    rng = np.random.default_rng(0)
    parts = data._partial_words("training", rng, 300)
    clips = data.split_audio("training")
    first, last = D.speech_extent(clips.samples[clips.keyword])
    word = np.median(last - first)
    loud = np.abs(parts) > 0.05
    inside = loud.sum(axis=1)
    # a fragment: never the whole word inside the window (tone words are ~0.3 s loud)
    assert np.percentile(inside, 95) < 0.8 * word
    assert (inside > 0).mean() > 0.9
    _, labels = data.training_epoch(np.random.default_rng(1), D.AugmentConfig())
    n_unknown = int((labels == 1).sum())
    assert n_unknown == pytest.approx(0.4 * len(labels), abs=3)
    plan = data._plan("training", np.random.default_rng(1), evaluation=False)
    assert (plan == D._PARTIAL).sum() == round(0.5 * n_unknown)  # half of _unknown_ is fragments


def test_gain_augmentation_changes_levels_within_the_bound(tiny_dataset):
    data = D.SpeechData(config(tiny_dataset, silence_share=0.0, unknown_share=0.0))
    plan = data._plan("training", np.random.default_rng(0), evaluation=False)
    clean = data._render("training", plan, np.random.default_rng(0))
    quiet = D.AugmentConfig(time_shift_ms=0, noise_probability=0, gain_db=6)
    louder = data._augment(clean.copy(), plan, np.random.default_rng(1), quiet)
    ratio = np.abs(louder).max(axis=1) / np.abs(clean).max(axis=1)
    assert ratio.min() >= 10 ** (-6 / 20) - 1e-3 and ratio.max() <= 10 ** (6 / 20) + 1e-3
    assert ratio.std() > 0.1


def test_change_speed_moves_pitch_and_length_together():
    seconds = np.arange(CLIP_SAMPLES) / CLIP_SAMPLES
    burst = np.sin(2 * np.pi * 1000 * seconds) * (np.abs(seconds - 0.5) < 0.25)  # 0.5 s, centred
    faster, same, slower = D.change_speed(np.tile(burst, (3, 1)), np.array([1.1, 1.0, 0.9]))
    np.testing.assert_allclose(same, burst, atol=1e-12)
    for played, factor in ((faster, 1.1), (slower, 0.9)):
        assert np.argmax(np.abs(np.fft.rfft(played))) == pytest.approx(1000 * factor, abs=2)  # 1 Hz bins
        assert np.count_nonzero(np.abs(played) > 1e-3) / CLIP_SAMPLES == pytest.approx(0.5 / factor, abs=0.01)


def test_speed_augmentation_stays_within_its_bound(tiny_dataset):
    with pytest.raises(ValueError, match="speed must be"):
        D.AugmentConfig(speed=1.5)
    data = D.SpeechData(config(tiny_dataset, silence_share=0.0, unknown_share=0.0))
    plan = data._plan("training", np.random.default_rng(0), evaluation=False)
    clean = data._render("training", plan, np.random.default_rng(0))
    only_speed = D.AugmentConfig(time_shift_ms=0, noise_probability=0, speed=0.15)
    played = data._augment(clean.copy(), plan, np.random.default_rng(1), only_speed)
    peak = np.argmax(np.abs(np.fft.rfft(played, axis=1)), axis=1) / np.argmax(
        np.abs(np.fft.rfft(clean, axis=1)), axis=1
    )
    assert peak.min() >= 0.85 - 0.01 and peak.max() <= 1.15 + 0.01
    assert peak.std() > 0.03


def test_extra_folders_only_ever_train(tiny_dataset, tmp_path):
    # Speakers s00 and s01 are on the validation list of tiny_dataset; here their clips are extra.
    extra = make_dataset(tmp_path / "extra", speakers_per_word=3, words=("yes", "bed"))
    plain = D.SpeechData(config(tiny_dataset))
    more = D.SpeechData(config(tiny_dataset, extra=[str(extra)]))
    extra_clips = [c for c in more.clips if extra in c.path.parents]
    assert len(extra_clips) == 6 and {c.split for c in extra_clips} == {"training"}
    assert [c for c in more.clips if c not in extra_clips] == plain.clips
    np.testing.assert_array_equal(
        more.evaluation_set("validation").audio, plain.evaluation_set("validation").audio
    )
    clips, plain_labels = more.split_audio("training"), plain.split_audio("training").labels
    assert len(clips.labels) == len(plain_labels) + 6 and clips.keyword.sum() == (plain_labels >= 2).sum() + 3
    assert more.summary()["extra"] == [str(extra.resolve())] and "synthesized" not in more.summary()
    (extra / "synth.json").write_text('{"seed": 3}')  # as kws synth leaves it
    assert more.summary()["synthesized"] == {str(extra.resolve()): {"seed": 3}}
    with pytest.raises(D.DataError, match=f"--extra folder {tmp_path / 'gone'} does not exist"):
        D.SpeechData(config(tiny_dataset, extra=[str(tmp_path / "gone")]))


def test_a_data_config_refuses_shares_without_keywords_and_words_one_folder_would_hold():
    for silence, unknown in ((0.6, 0.5), (0.5, 0.5)):  # a sum of exactly 1 leaves none either
        with pytest.raises(
            D.DataError, match=rf"silence_share {silence} \+ unknown_share {unknown} leave no"
        ):
            D.DataConfig(data_dir="d", silence_share=silence, unknown_share=unknown)
    # as a config.json edited by hand gives them; --words refuses them the same way
    with pytest.raises(D.DataError, match="keywords that differ only in letter case: Yes, yes"):
        D.DataConfig(data_dir="d", words=["Yes", "yes"])


def test_a_keywords_folder_in_other_letters_is_refused_and_a_decomposed_name_is_the_same_word(tmp_path):
    import unicodedata

    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no"))
    (data / "Yes").mkdir()  # as the README's "your folders beside the others" can give
    with pytest.raises(D.DataError, match=f"{data / 'Yes'} is not the keyword 'yes': folder names are case"):
        D.SpeechData(D.DataConfig(str(data), words=["yes", "no"]))
    (data / "Yes").rmdir()
    # macOS writes "café" decomposed; --words and list lines give it composed
    (data / "no").rename(data / unicodedata.normalize("NFD", "café"))
    clips = D.SpeechData(D.DataConfig(str(data), words=["yes", "café"])).clips
    assert {clip.word for clip in clips} == {"yes", "café"} and len(clips) == 6
    nfd = unicodedata.normalize("NFD", "café")
    decomposed = D.DataConfig(str(data), words=["yes", nfd])  # as a config.json may hold it
    assert decomposed.words == ["yes", "café"] and D.SpeechData(decomposed).clips == clips
    (data / nfd / nfd).mkdir()  # the keyword's own folder one level down, as macOS names it
    D.check_keyword_folders(decomposed)


def test_negative_recordings_in_a_format_kws_does_not_read_are_named(negatives_dir, capsys):
    chapter = negatives_dir / "100" / "1"
    (chapter / "100-1.trans.txt").write_text("100-1-0000 NOT A KEYWORD\n")  # a transcript: not named
    D.NegativeBank([str(negatives_dir)], 0.0)
    assert "left out" not in capsys.readouterr().err
    (chapter / "100-1-0099.m4a").write_bytes(b"")
    (chapter / "100-1-0098.m4a").write_bytes(b"")
    D.NegativeBank([str(negatives_dir)], 0.0)
    assert (
        f"warning: left out, not being audio kws reads: files in --negatives {negatives_dir} (.m4a 2; the "
        f"first: {chapter / '100-1-0098.m4a'}); recordings among them: convert to a format kws reads ("
    ) in capsys.readouterr().err
    only = chapter.parent / "m4a"  # a folder of them alone: refused, saying what it holds
    only.mkdir()
    (chapter / "100-1-0099.m4a").rename(only / "a.m4a")
    with pytest.raises(
        D.DataError, match=r"^--negatives folder .*/m4a holds no audio files kws reads \(\.m4a 1: conv"
    ):
        D.NegativeBank([str(only)], 0.0)


def test_negative_speech_whose_transcript_says_a_keyword_is_left_out(negatives_dir, capsys):
    chapter = negatives_dir / "100" / "1"
    # the third line's recording is not there: nothing of it to leave out, nor to count
    lines = "100-1-0000 SHE SAID YES TO IT\n100-1-0001 NOT YESTERDAY\n100-1-0002 YES YES\n"
    (chapter / "100-1.trans.txt").write_text(lines)
    everything = D.NegativeBank([str(negatives_dir)], 0.0)
    bank = D.NegativeBank([str(negatives_dir)], 0.0, ("Yes", "no"))
    assert len(everything.tracks["training"]) == 10 and len(bank.tracks["training"]) == 9
    assert bank.left_out == {"Yes": 1}  # whole words only: not "yesterday"
    assert (
        "--negatives: left out 1 of 10 recordings, whose transcripts say a keyword (Yes 1)"
        in capsys.readouterr().err
    )


def test_clips_in_subfolders_are_read_and_named_by_their_path_in_the_lists(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no"))
    for speaker in ("alice", "bob"):
        (data / "yes" / speaker).mkdir()
        for take in range(3):
            sf.write(data / "yes" / speaker / f"take{take}.wav", tone(400.0, seed=take), 16000)
    with open(data / "validation_list.txt", "a") as lines:  # a Windows path, and a line naming no clip
        lines.write("yes\\alice\\take1.wav\n.\\yes\\bob\\take0.wav\n/yes//bob/take2.wav\nyes/\n")
    split = {clip.path.relative_to(data).as_posix(): clip.split for clip in D.scan(data)}
    assert len([name for name in split if name.count("/") == 2]) == 6
    assert split["yes/alice/take1.wav"] == "validation"  # by the list
    assert split["yes/bob/take1.wav"] == D.which_set("bob", 10, 10) != "validation"  # not alice's
    assert split["yes/bob/take0.wav"] == split["yes/bob/take2.wav"] == "validation"  # written other ways
    assert "that name no clip there: 1 of " in capsys.readouterr().err  # "yes/": warned, not a crash
    sf.write(data / "yes" / "alice" / "solo.wav", tone(400.0), 16000)
    (data / "validation_list.txt").write_text("yes/take1.wav\nyes/solo.wav\n")  # her folder left out
    D.scan(data)
    err = capsys.readouterr().err
    assert err.endswith(", so yes/solo.wav is likely yes/alice/solo.wav\n")  # take1: alice's or bob's?


def test_a_folder_per_speaker_names_the_speaker_of_files_that_do_not(tmp_path):
    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no"))
    speakers = [f"speaker{n}" for n in range(12)]
    for speaker in speakers:  # every speaker's takes share their names, as recorders number them
        (data / "yes" / speaker / "session").mkdir(parents=True)
        for take in range(3):
            sf.write(data / "yes" / speaker / f"take{take}.wav", tone(400.0, seed=take), 16000)
        sf.write(data / "yes" / speaker / "session" / "dan_nohash_0.wav", tone(300.0), 16000)
    clips = [c for c in D.scan(data) if c.path.parent.parent.name == "yes"]
    splits = {speaker: {c.split for c in clips if c.speaker == speaker} for speaker in speakers}
    assert len(clips) == 36 and splits == {speaker: {D.which_set(speaker, 10, 10)} for speaker in speakers}
    assert len(set.union(*splits.values())) == 2  # "training" and "testing": not by take
    clips = D.scan(data)
    assert {c.speaker for c in clips if c.path.name == "dan_nohash_0.wav"} == {"dan"}  # the name first
    assert {c.speaker for c in clips if c.path.parent.name == "yes"} == {"00yesab", "01yesab", "02yesab"}
    (data / "yes" / "plain.wav").write_bytes((data / "yes" / "speaker0" / "take0.wav").read_bytes())
    assert [c.speaker for c in D.scan(data) if c.path.name == "plain.wav"] == [None]  # a speaker of its own


def test_a_keywords_folder_inside_another_words_or_a_file_in_its_place_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", speakers_per_word=3, words=("yes", "no", "bed"))
    (data / "synth" / "yes").mkdir(parents=True)  # as `kws synth --out data/synth` would leave it
    with pytest.raises(
        D.DataError, match=f"{data / 'synth' / 'yes'} holds clips of a keyword inside the folder"
    ):
        D.check_keyword_folders(D.DataConfig(str(data), words=["yes", "no"]))
    shutil.rmtree(data / "synth")
    (data / "yes" / "yes").mkdir()  # the keyword's own clips, one folder down
    (data / "bed" / "Yes").mkdir()  # a speaker of "bed" who happens to be called Yes
    D.check_keyword_folders(D.DataConfig(str(data), words=["yes", "no"]))
    with pytest.raises(
        D.DataError, match=f"{tmp_path} holds no keyword's folder, but {data} does: pass --data {data}$"
    ):
        D.check_keyword_folders(D.DataConfig(str(tmp_path), words=["yes", "no"]))  # one level too high
    (tmp_path / "more" / "synth" / "yes").mkdir(parents=True)  # an --extra one level too high
    with pytest.raises(
        D.DataError, match="synth/yes holds clips of a keyword inside the folder of the word 'synth'"
    ):
        D.check_keyword_folders(D.DataConfig(str(data), words=["yes", "no"], extra=[str(tmp_path / "more")]))
    (data / "up").write_text("not a folder")
    with pytest.raises(D.DataError, match=f"{data / 'up'} is a file, not a folder of clips"):
        D.check_keyword_folders(D.DataConfig(str(data), words=["yes", "up"]))
