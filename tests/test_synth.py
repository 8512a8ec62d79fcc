"""Synthetic training clips: word lists, placement and level, espeak-ng's clips on disk."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import soundfile as sf
from conftest import need

from kws import data as D
from kws import synth
from kws.cli import main
from kws.features import CLIP_SAMPLES, SAMPLE_RATE


@pytest.fixture
def espeak():
    need(shutil.which(synth.ESPEAK), "espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")


def test_other_words_leave_out_the_keywords_and_their_homophones():
    others = synth.other_words(["no", "right", "yes"])
    assert not {"no", "know", "right", "write", "rite", "wright", "yes"} & set(others)
    assert {"off", "on", "dog", "yellow"} <= set(others)
    assert len(others) == len(set(others)) > 250
    # Either way round: the keyword "to" leaves out "two", as "two" leaves out "to".
    assert "two" not in synth.other_words(["to"]) and "to" not in synth.other_words(["two"])
    assert "ok" not in synth.other_words(["okay"]) and "two" in synth.other_words(["okay"])
    assert not {"ok", "okay"} & set(synth.other_words(["OK"]))  # in any letter case


def test_place_trims_centres_and_sets_the_level():
    rng = np.random.default_rng(0)
    word = np.sin(np.arange(4000) * 0.3).astype(np.float32)
    speech = np.concatenate([np.zeros(3000, np.float32), word, np.zeros(9000, np.float32)])
    for _ in range(50):
        clip = synth.place(speech, rng)
        assert clip.shape == (CLIP_SAMPLES,)
        loud = np.flatnonzero(clip)
        assert loud[-1] - loud[0] < 4000  # the silence around the word is gone
        middle = (loud[0] + loud[-1]) / 2
        assert abs(middle - CLIP_SAMPLES / 2) <= (CLIP_SAMPLES - 4000) / 4 + 1
        level = 20 * np.log10(np.sqrt(np.mean(clip[loud[0] : loud[-1] + 1] ** 2)))
        assert synth.LEVEL_DB[0] - 0.1 <= level <= synth.LEVEL_DB[1] + 0.1
    np.testing.assert_array_equal(synth.place(np.zeros(8000, np.float32), rng), np.zeros(CLIP_SAMPLES))


def test_synthesize_writes_one_voice_per_clip_reproducibly(espeak, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "OTHER_WORDS", ["cat", "yes", "know"])
    spoken, say = [], synth.say
    monkeypatch.setattr(synth, "say", lambda word, voice: spoken.append((word, voice)) or say(word, voice))
    config = synth.SynthConfig(per_keyword=3, per_other_word=2, seed=1)
    assert synth.synthesize(["yes", "no"], tmp_path / "a", config) == 3 + 3 + 2
    made = json.loads((tmp_path / "a" / synth.SETTINGS_FILE).read_text())  # a run with --extra records it
    assert made == {
        **made,
        "keywords": ["yes", "no"],
        "per_keyword": 3,
        "per_other_word": 2,
        "seed": 1,
        "clips": 8,
    }
    assert made["espeak_ng"].startswith("eSpeak NG text-to-speech: ")
    assert len({voice for word, voice in spoken if word == "yes"}) == 3  # each clip its own voice
    synth.synthesize(["yes", "no"], tmp_path / "b", config)
    synth.synthesize(["yes", "no"], tmp_path / "c", synth.SynthConfig(3, 2, seed=2))
    clips = D.scan(tmp_path / "a", split="training")
    assert sorted({c.word for c in clips}) == ["cat", "no", "yes"]
    assert len({D.speaker_id(c.path) for c in clips if c.word == "yes"}) == 3
    for clip in clips:
        samples, rate = sf.read(clip.path, dtype="float32")
        assert rate == SAMPLE_RATE and samples.shape == (CLIP_SAMPLES,)
        rms = 20 * np.log10(np.sqrt(np.mean(samples**2)))
        assert synth.LEVEL_DB[0] - 15 < rms < synth.LEVEL_DB[1]  # a word, quieter over the whole second
        assert (tmp_path / "b" / clip.path.relative_to(tmp_path / "a")).read_bytes() == clip.path.read_bytes()
    other_seed = D.scan(tmp_path / "c", split="training")
    assert len(other_seed) == len(clips)
    assert {c.path.name for c in other_seed}.isdisjoint(c.path.name for c in clips)


def stopped_at_the_fourth_clip(monkeypatch, stop) -> None:
    """synth without espeak-ng, one voice and one other word, calling ``stop`` as it says the fourth clip."""
    monkeypatch.setattr(synth, "OTHER_WORDS", ["cat"])
    monkeypatch.setattr(synth, "variants", lambda: ["en-us+m1"])
    said = []

    def say(word, voice):
        said.append(word)
        if len(said) == 4:
            stop()
        return np.full(4000, 0.1, np.float32)

    monkeypatch.setattr(synth, "say", say)


def test_sound_alikes_of_own_keywords_get_a_keywords_share_of_clips(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "OTHER_WORDS", ["cat", "horse"])
    monkeypatch.setattr(synth, "variants", lambda: ["m1"])
    monkeypatch.setattr(synth, "say", lambda word, voice: np.full(4000, 0.1, np.float32))
    config = synth.SynthConfig(per_keyword=3, per_other_word=1, sound_alikes=["mouse", "horse"])
    assert synth.synthesize(["house"], tmp_path / "a", config) == 3 + 3 + 3 + 1
    counts = {
        folder.name: len(list(folder.iterdir())) for folder in (tmp_path / "a").iterdir() if folder.is_dir()
    }
    assert counts == {"house": 3, "mouse": 3, "horse": 3, "cat": 1}  # "horse" once, as a sound-alike
    assert json.loads((tmp_path / "a" / synth.SETTINGS_FILE).read_text())["sound_alikes"] == [
        "mouse",
        "horse",
    ]
    # A keyword, or a word said as one, would teach the model that the keyword is not one.
    for keywords, alike in ((["house"], "House"), (["no"], "know")):
        with pytest.raises(
            synth.SynthError, match=f"--sound-alikes {alike!r} is a keyword or is said as one"
        ):
            synth.synthesize(keywords, tmp_path / "b", synth.SynthConfig(sound_alikes=[alike]))
    assert not (tmp_path / "b").exists()
    assert main(["synth", "--words", "no", "--sound-alikes", "know,now", "--out", str(tmp_path / "c")]) == 2
    assert "--sound-alikes 'know' is a keyword or is said as one" in capsys.readouterr().err


def test_an_interrupted_synthesis_leaves_no_clips_and_a_rerun_succeeds(tmp_path, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    stopped_at_the_fourth_clip(monkeypatch, ctrl_c)
    out = tmp_path / "synth"
    out.mkdir()  # as a user may make it first
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize(["yes"], out, synth.SynthConfig(per_keyword=4, per_other_word=4))
    assert list(tmp_path.iterdir()) == [out] and not any(out.iterdir())
    assert (
        main(["synth", "--words", "yes", "--out", str(out), "--per-keyword", "2", "--per-other-word", "1"])
        == 0
    )
    assert sorted(path.parent.name for path in out.rglob("*.wav")) == ["cat", "yes", "yes"]


def test_an_unknown_voice_is_a_synth_error(espeak):
    reason = "could not say 'yes' as zz-nowhere\\+m1: Error: The specified espeak-ng voice does not exist"
    with pytest.raises(synth.SynthError, match=reason):
        synth.say("yes", synth.Voice("zz-nowhere", "m1", 50, 160))


def test_a_word_starting_with_a_dash_is_spoken_not_taken_for_an_option(espeak):
    speech = synth.say("-yes", synth.Voice("en-us", "m1", 50, 160))
    assert len(speech) > SAMPLE_RATE // 10 and np.abs(speech).max() > 0.1


def test_synth_refuses_a_folder_that_holds_files(tmp_path, capsys):
    (tmp_path / "old.wav").write_bytes(b"")
    assert main(["synth", "--words", "yes", "--out", str(tmp_path)]) == 2
    assert (
        f"--out {tmp_path} holds other files (old.wav): synthesized speech goes into a new or empty folder"
        in (capsys.readouterr().err)
    )


def test_without_espeak_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(synth.SynthError, match="apt-get install espeak-ng"):
        synth.variants()


def test_a_synthesis_stopped_by_sigterm_leaves_no_clips_and_says_so(tmp_path, monkeypatch, capsys):
    # As timeout, systemd or docker stop would.
    stopped_at_the_fourth_clip(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "synth"
    argv = ["synth", "--words", "yes", "--out", str(out), "--per-keyword", "40", "--per-other-word", "40"]
    assert main(argv) == 128 + signal.SIGTERM
    assert not any(out.iterdir())  # however far it got
    assert capsys.readouterr().err == "\nkws synth: stopped by SIGTERM\n"
