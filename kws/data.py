"""Training and evaluation examples: Speech Commands folders, negative speech, noise, augmentation.

Two folder layouts are read:

* the dataset (``speech_commands_v0.02``): one folder per word, ``_background_noise_/``,
  ``validation_list.txt`` and ``testing_list.txt``. A clip named in a list belongs to
  that split; any other clip is placed by the dataset's own speaker hash
  (``which_set``), so one speaker never sits on both sides.
* the test set package (``speech_commands_test_set_v0.02``): one folder per class,
  ``_silence_`` and ``_unknown_`` included; every clip is a test clip.

Labels are ``_silence_``, ``_unknown_``, then the keywords. Every other word is
``_unknown_``. ``_silence_`` and ``_unknown_`` examples are drawn fresh for each
training epoch: silence is background noise at any level from near silence up to the
noise file's own level; unknown is other words and random 1 s windows of ``--negatives``
speech. Validation and test sets are drawn the same way from held-out clips, held-out
negative speakers and the held-out tail of each noise file, with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kws import KwsError, audio
from kws.evaluate import tally
from kws.features import CLIP_SAMPLES, HOP_SAMPLES, NUM_FRAMES, NUM_MEL_BANDS, NUM_MFCC, SAMPLE_RATE, mfcc
from kws.stream import SILENCE, UNKNOWN
from kws.synth import SETTINGS_FILE as SYNTH_SETTINGS

NOISE_FOLDER = "_background_noise_"
# Of speakers the data set's hash puts in validation, and in test, where no list names a clip.
HASH_PERCENT = 10.0
DEFAULT_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SPLITS = ("training", "validation", "testing")
# The files naming the clips of a split, as Speech Commands ships them; other clips go by hash.
SPLIT_LISTS = {"validation": "validation_list.txt", "testing": "testing_list.txt"}
_MAX_FILES_PER_CLASS = 2**27 - 1  # the constant of the dataset's which_set


class DataError(KwsError, ValueError):
    """A data folder that cannot be used as given; the message says what to do."""


@dataclass
class DataConfig:
    """Where examples come from and in which shares."""

    data_dir: str
    words: list[str] = field(default_factory=lambda: list(DEFAULT_WORDS))
    negatives: list[str] = field(default_factory=list)
    # Folders of clips in the same layout that only ever train (e.g. `kws synth`'s): they never
    # enter validation, so models trained with and without them compare on the same examples.
    extra: list[str] = field(default_factory=list)
    silence_share: float = 0.1  # of all training examples
    unknown_share: float = 0.1  # of all training examples
    negatives_fraction: float = 0.5  # of _unknown_ examples taken from --negatives speech
    # of _unknown_ training examples made from keyword clips holding only part of the word, or
    # the first half of one keyword joined to the second half of another
    partial_fraction: float = 0.0
    validation_percent: float = HASH_PERCENT  # speaker hash, for clips no list names
    testing_percent: float = HASH_PERCENT
    negatives_validation_share: float = 0.2  # of negative speakers held out
    noise_validation_share: float = 0.2  # tail of each noise file held out

    def __post_init__(self):
        for name in ("silence_share", "unknown_share"):
            if not 0 <= getattr(self, name) < 1:
                raise DataError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.silence_share + self.unknown_share >= 1:
            raise DataError(
                f"silence_share {self.silence_share:g} + unknown_share {self.unknown_share:g} leave no room "
                "for keywords: keep their sum (--silence-share, --unknown-share) below 1"
            )
        for name in ("negatives_fraction", "partial_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.words = [word_form(word) for word in self.words]  # as folder names are read
        if len(set(self.words)) != len(self.words) or not self.words:
            raise DataError(f"words must be a non-empty list without repeats, got {self.words}")
        check_words(self.words)


def check_words(words: list[str]) -> None:
    """DataError unless each word can be a keyword: its clips sit in a folder of that name."""
    if len({word.casefold() for word in words}) < len(words):  # one folder on a disk that folds case
        raise DataError(f"keywords that differ only in letter case: {', '.join(words)}")
    for word in words:
        if word.startswith("_"):
            raise DataError(f"keyword {word!r} may not start with '_' (reserved for classes)")
        if word.startswith(".") or "/" in word or "\\" in word:
            raise DataError(f"keyword {word!r} cannot be a folder's name: no / or \\, and no leading '.'")


@dataclass
class AugmentConfig:
    """Training-only changes to each example, drawn anew every epoch."""

    time_shift_ms: float = 100.0
    noise_probability: float = 0.8
    noise_volume: float = 0.1
    gain_db: float = 0.0  # speech louder or quieter by up to this much
    # Speech played up to this much faster or slower (pitch and tempo together), as
    # kws_streaming's `resample` (0.15 in its recipes): speakers differ in both.
    speed: float = 0.0
    # Above 0: each example heard through a random microphone, whose response over the mel
    # bands is a sum of the CHANNEL_SHAPES smoothest cosines, each of this many dB (its standard
    # deviation): the same for every frame, as a microphone's is.
    channel_db: float = 0.0
    spec_augment: bool = False
    time_masks: int = 2
    time_mask_frames: int = 5  # widest mask
    freq_masks: int = 2
    freq_mask_coefficients: int = 2

    def __post_init__(self):
        if not self.channel_db >= 0:
            raise ValueError(f"channel_db must be 0 or more, got {self.channel_db}")
        if not 0 <= self.speed < 1:
            raise ValueError(
                f"speed must be from 0 to below 1 (0.15: up to 15 % faster or slower), got {self.speed}"
            )


def labels_for(words) -> list[str]:
    return [SILENCE, UNKNOWN, *words]


def _nohash_speaker(path: Path) -> str | None:
    """The speaker a Speech Commands file name gives, before ``_nohash_``; else None."""
    return re.sub(r"_nohash_.*$", "", path.name) if "_nohash_" in path.name else None


def speaker_id(path: Path) -> str:
    """Speaker of a recording: Speech Commands' name, LibriSpeech's first field, else the file."""
    librispeech = re.match(r"^(\d+)-\d+-\d+$", path.stem)
    return _nohash_speaker(path) or (librispeech.group(1) if librispeech else path.stem)


def clip_speaker(relative: Path) -> str | None:
    """Speaker of a clip at ``relative`` below its word's folder: the one its name gives, else the
    subfolder it sits in (``alice/take1.wav``: a folder per speaker, whose files need not say
    it), else None: the clip is split as a speaker of its own (a take named 2024-05-01.wav too,
    which LibriSpeech's rule would file under "2024")."""
    return _nohash_speaker(relative) or (relative.parts[0] if len(relative.parts) > 1 else None)


def speaker_hash(speaker: str) -> str:
    """SHA-1 of a speaker id, hex, as the data set's split rule takes it (names need not be UTF-8)."""
    return hashlib.sha1(os.fsencode(speaker)).hexdigest()


def which_set(speaker: str, validation_percent: float, testing_percent: float) -> str:
    """The dataset's split rule (``input_data.which_set``): SHA-1 of the speaker id."""
    if not isinstance(speaker, str):  # a path would hash whole, to a split of its own
        raise TypeError(f"which_set takes a speaker id, got {speaker!r}: pass speaker_id(path)")
    digest = speaker_hash(speaker)
    percent = (int(digest, 16) % (_MAX_FILES_PER_CLASS + 1)) * (100.0 / _MAX_FILES_PER_CLASS)
    if percent < validation_percent:
        return "validation"
    if percent < validation_percent + testing_percent:
        return "testing"
    return "training"


@dataclass(frozen=True)
class Clip:
    path: Path
    word: str  # folder name: a word, or _silence_ / _unknown_ in the test package
    split: str
    hashed: bool = False  # split by the speaker hash, not by a list
    speaker: str | None = None  # None: the file names none, and is split as a speaker of its own


def speakers_on_both_sides(clips: list[Clip], held_out: str) -> dict[str, tuple[Clip, Clip]]:
    """Speakers (as Speech Commands names them) with clips in the ``held_out`` split and in
    training: one clip of each side per speaker. Only split lists that name part of a speaker's
    clips do that; the speaker hash keeps each speaker on one side."""
    sides: dict[str, dict[str, Clip]] = {}
    for clip in clips:
        if clip.speaker is not None and clip.split in ("training", held_out):
            sides.setdefault(clip.speaker, {}).setdefault(clip.split, clip)
    return {speaker: (side[held_out], side["training"]) for speaker, side in sides.items() if len(side) == 2}


def _clip_key(word: str, path: str) -> str:
    """A clip's name in the split lists: WORD/PATH below the word's folder, without its suffix
    (lists name .wav files; a re-encoded copy of the dataset, FLAC, must still match). A
    doubled / is one; an empty PATH names no clip."""
    name = "/".join(part for part in path.split("/") if part)
    return word_form(f"{word}/{re.sub(r'[.][^./]*$', '', name)}")


def _read_list(root: Path, name: str) -> dict[str, str]:
    """The clips a split list names: clip key -> the line naming it."""
    path = root / name
    if not path.exists():
        return {}
    if path.is_dir():
        raise DataError(f"{path} is a folder: a split list is a text file, one WORD/FILE a line")
    try:  # utf-8-sig: a byte-order mark, as Windows editors write, is no part of the first line
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: save it as UTF-8, one WORD/FILE a line") from None
    keys = {}
    for line in text.splitlines():
        # Backslashes: a Windows path. A leading ./ or / names the same clip.
        path = line.strip().replace("\\", "/")
        while path.startswith(("./", "/")):
            path = path.removeprefix(".").removeprefix("/")
        if path:
            word, _, file = path.partition("/")
            keys[_clip_key(word, file)] = line.strip()
    return keys


def _warn_unmatched(root: Path, name: str, listed: dict[str, str], found: dict[str, str]) -> None:
    """Say how many lines of a split list name no clip (``found``: clip key -> its path below
    ``root``): their clips would go to a split by hash."""
    missing = {key: line for key, line in listed.items() if key not in found}
    if missing:
        shown = ", ".join(list(missing.values())[:3]) + (", ..." if len(missing) > 3 else "")
        tqdm.write(
            f"warning: lines of {root / name} that name no clip there: {len(missing)} of {len(listed)} "
            f"({shown}); a line is WORD/PATH, the clip's path below {root}{_likely_meant(missing, found)}",
            file=sys.stderr,
        )


def _likely_meant(missing: dict[str, str], found: dict[str, str]) -> str:
    """A hint for the first line that names a clip but for its letter case, or for the speaker's
    folder it leaves out (yes/take1.wav for yes/alice/take1.wav): lists written by hand do."""

    def word_and_name(key: str) -> tuple[str, str]:
        return key.split("/")[0], key.rsplit("/", 1)[-1]

    folded = {key.casefold(): path for key, path in found.items()}
    by_name: dict[tuple[str, str], list[str]] = {}
    for key, path in found.items():
        by_name.setdefault(word_and_name(key), []).append(path)
    for key, line in missing.items():
        if key.casefold() in folded:
            return f", and letter case counts: {line} is {folded[key.casefold()]} there"
        named = by_name.get(word_and_name(key), [])
        if len(named) == 1:
            return f", so {line} is likely {named[0]}"
    return ""


def is_test_package(root: Path) -> bool:
    return (root / SILENCE).is_dir() or (root / UNKNOWN).is_dir()


def _no_clips(root: Path) -> DataError:
    return DataError(
        f"no audio clips found in {root}: expected one folder per word "
        f"(Speech Commands layout) with audio files ({audio.AUDIO_SUFFIX_TEXT})"
    )


def check_data_dir(root: Path) -> None:
    """DataError unless ``root`` is a folder of folders, saying what it is instead."""
    if root.is_dir():
        if not any(path.is_dir() for path in root.iterdir()):
            if any(path.suffix.lower() in audio.AUDIO_SUFFIXES for path in root.iterdir()):
                raise DataError(
                    f"{root} holds audio files but no folder of them: it reads as one word's clips; "
                    f"pass the folder that holds one such folder per word ({root.parent})"
                )
            raise _no_clips(root)
        return
    if root.exists():
        raise DataError(
            f"{root} is a file, not a data folder: pass --data DIR, the folder holding one folder "
            "of clips per word (or the test set package)"
        )
    raise DataError(f"data folder {root} does not exist; pass --data DIR or run `kws download`")


def check_folders(config: DataConfig) -> None:
    """DataError naming the first folder of ``config`` that is missing or misnamed: the data, the
    negatives and the extra clips are checked before any is read."""
    check_data_dir(Path(config.data_dir))
    check_added_folders(config)
    check_misnamed_folders(config)


def word_form(text: str) -> str:
    """A word or clip name composed (NFC): macOS writes names decomposed ("e" + accent) where a
    keyboard types "é" whole, the same word to a reader. Every keyword and name is compared so."""
    return unicodedata.normalize("NFC", text)


def folder_word(folder: Path) -> str:
    """The word a folder of clips holds: its name."""
    return word_form(folder.name)


def check_misnamed_folders(config: DataConfig) -> None:
    """DataError naming a folder of the data or of --extra whose clips would train as _unknown_,
    against a keyword: the keyword in other letters (Yes/ beside yes/), or the keyword's folder
    inside another word's (synth/yes/: its clips are the word "synth")."""
    folded = {word.casefold(): word for word in config.words}
    roots = list(map(Path, [config.data_dir, *config.extra]))

    def spelled(word: str) -> bool:  # as --words has it, in some folder: respelling would refuse that one
        return any((root / word).is_dir() for root in roots)

    for root in roots:
        tops = {folder_word(path) for path in root.iterdir()}
        for path in sorted(root.iterdir()):
            name = folder_word(path)
            if name not in config.words and name.casefold() in folded and path.is_dir():
                raise DataError(
                    f"{path} is not the keyword {folded[name.casefold()]!r}: folder names are "
                    f"case-sensitive, and its clips would teach the model that {name!r} is not a "
                    "keyword; rename the folder (or merge it into the keyword's)"
                    + ("" if spelled(folded[name.casefold()]) else f", or spell it {name!r} in --words")
                )
            if name.startswith("_") or not path.is_dir():
                continue
            with os.scandir(path) as entries:  # yes/yes/ is the keyword's, and a speaker may be "Sheila"
                inner = [
                    e.name
                    for e in entries
                    if word_form(e.name) in config.words and word_form(e.name) != name and e.is_dir()
                ]
            if inner and root == Path(config.data_dir) and not tops & set(config.words):  # one level up
                raise DataError(f"{root} holds no keyword's folder, but {path} does: pass --data {path}")
            if inner:
                raise DataError(
                    f"{path / inner[0]} holds clips of a keyword inside the folder of the word {name!r}, "
                    f"whose clips they would be; move it up beside {name}/, or pass {path} with --extra "
                    "(its clips then only train)"
                )


def word_folders(config: DataConfig, word: str) -> list[Path]:
    """Where ``word``'s clips are: its folders in the data and in --extra (or links to nowhere)."""
    roots = [Path(config.data_dir), *map(Path, config.extra)]
    return [root / name for root in roots for name in os.listdir(root) if folder_word(root / name) == word]


def check_keyword_folders(config: DataConfig) -> None:
    """``check_folders``, and a DataError naming a keyword that has no folder in the data or in
    --extra: told before TensorFlow loads and every clip is read, which takes minutes on the
    full data set. For training: a test needs no folder of every keyword."""
    check_folders(config)
    for word in config.words:
        folders = word_folders(config, word)
        if any(folder.is_dir() for folder in folders):
            continue
        broken = [folder for folder in folders if folder.is_symlink() and not folder.exists()]
        if broken:
            raise DataError(f"{broken[0]} links to {os.readlink(broken[0])}, which does not exist")
        if folders:
            raise DataError(
                f"{folders[0]} is a file, not a folder of clips: put the clips of {word!r} in a "
                "folder of that name"
            )
        advice = (
            f"the default keywords ({','.join(DEFAULT_WORDS)}) include it: pass --words with yours"
            if config.words == list(DEFAULT_WORDS)
            else "check the spelling in --words"
        )
        raise DataError(f"no folder {word!r} in {' or '.join([config.data_dir, *config.extra])}: {advice}")


def check_added_folders(config: DataConfig) -> None:
    """DataError naming the first of ``config``'s negatives and extra folders that is unusable."""
    for folder in map(Path, config.negatives):
        if folder.is_file():
            raise DataError(f"--negatives {folder} is a file: pass the folder that holds it")
        if not folder.is_dir():
            raise DataError(f"--negatives folder {folder} does not exist")
        if folder.resolve().name == NOISE_FOLDER:  # it would train as _unknown_ and as _silence_
            raise DataError(
                f"--negatives {folder} is background noise: --negatives wants speech without the "
                f"keywords, such as LibriSpeech; noise belongs in the data's own {NOISE_FOLDER}/"
            )
        held = [name for name in (*config.words, NOISE_FOLDER) if (folder / name).is_dir()]
        if held:  # every file under it would be taken for speech without keywords
            raise DataError(
                f"--negatives {folder} holds {', '.join(held)}: it looks like the Speech Commands folder; "
                "--negatives wants speech without the keywords, such as LibriSpeech"
            )
    for folder in map(Path, config.extra):
        if folder.is_file():
            raise DataError(f"--extra {folder} is a file: pass the folder of word folders that holds it")
        if not folder.is_dir():
            raise DataError(
                f"--extra folder {folder} does not exist; make one with `kws synth --out {folder}`"
            )
        if not config.data_dir:  # the data set is yet to be downloaded: nothing to overlap
            continue
        extra, data = folder.resolve(), Path(config.data_dir).resolve()
        if extra.is_relative_to(data) or data.is_relative_to(extra):
            # Its clips would train twice, the data's validation and test clips among them.
            raise DataError(
                f"--extra {folder} is the data folder {config.data_dir}, or inside it or around it: "
                "--extra is for clips the data does not hold (such as `kws synth`'s); leave it out"
            )


def scan(
    root: Path,
    validation_percent: float = HASH_PERCENT,
    testing_percent: float = HASH_PERCENT,
    split: str | None = None,
) -> list[Clip]:
    """Every labelled clip under ``root`` (either layout) with its split, or all in ``split``."""
    root = Path(root)
    check_data_dir(root)
    package = is_test_package(root)
    validation = _read_list(root, SPLIT_LISTS["validation"])
    testing = _read_list(root, SPLIT_LISTS["testing"])
    clips, others, found = [], [], {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        word = folder_word(folder)
        if word.startswith("_") and word not in (SILENCE, UNKNOWN):
            continue
        for path in audio.audio_files_under(folder, others):  # subfolders too
            relative = path.relative_to(folder)
            key = _clip_key(word, relative.as_posix())
            found[key] = f"{folder.name}/{relative.as_posix()}"
            speaker = clip_speaker(relative)
            hashed = False
            if split:
                clip_split = split
            elif package:
                clip_split = "testing"
            elif key in validation:
                clip_split = "validation"
            elif key in testing:
                clip_split = "testing"
            else:
                split_by = speaker if speaker is not None else path.stem
                clip_split, hashed = which_set(split_by, validation_percent, testing_percent), True
            clips.append(Clip(path, word, clip_split, hashed, speaker))
    if not clips:
        raise _no_clips(root)
    for name, listed in ((SPLIT_LISTS["validation"], validation), (SPLIT_LISTS["testing"], testing)):
        _warn_unmatched(root, name, listed, found)
    _warn_left_out(f"files in the word folders of {root}", others)
    return clips


def _warn_left_out(where: str, others: list[Path]) -> None:
    """Warn of files found among the recordings but not read: a format kws does not read, such
    as .m4a, would otherwise leave its recordings out unseen."""
    if others:
        tqdm.write(
            f"warning: left out, not being audio kws reads: {where} ({_kinds(others)}; the first: "
            f"{min(others)}); recordings among them: {audio.CONVERT}",
            file=sys.stderr,
        )


def _kinds(paths: list[Path]) -> str:
    """Files by suffix, as ".m4a 3, .txt 1"."""
    return tally(Counter(path.suffix.lower() or path.name for path in paths))


def _not_transcripts(others: list[Path]) -> list[Path]:
    """The files beside --negatives recordings but LibriSpeech's transcripts and notes (.txt)."""
    return [path for path in others if path.suffix.lower() != ".txt"]


# A clip longer than this loses part of itself to the 1 s the model sees (a few ms over are
# encoders' padding, and lose their end, as the reference recipe cuts them).
LONG_CLIP_SAMPLES = CLIP_SAMPLES + SAMPLE_RATE // 20


def around_the_sound(samples: np.ndarray) -> np.ndarray:
    """The CLIP_SAMPLES of a longer recording centred on its sound: the loudest second found,
    then moved to centre on that second's energy. A take recorded by hand holds its word
    anywhere, often after a second of silence, which the first second would miss."""
    energy = np.concatenate([[0.0], np.cumsum(np.square(samples, dtype=np.float64))])
    loudest = int(np.argmax(energy[CLIP_SAMPLES:] - energy[:-CLIP_SAMPLES]))
    window = np.square(samples[loudest : loudest + CLIP_SAMPLES], dtype=np.float64)
    centre = loudest + (np.arange(CLIP_SAMPLES) @ window / window.sum() if window.any() else CLIP_SAMPLES / 2)
    start = int(np.clip(round(centre - CLIP_SAMPLES / 2), 0, len(samples) - CLIP_SAMPLES))
    return samples[start : start + CLIP_SAMPLES]


# A clip whose peak stays under this (33 in 32768) holds no word anyone could hear: 10 keyword
# clips of the shared Speech Commands subset peak at 5 to 17. Kept, it labels silence as a word.
SILENT_PEAK = 10 ** (-60 / 20)


def load_clips(paths, description: str) -> tuple[np.ndarray, list[int]]:
    """Read 1 s clips as int16 (n, CLIP_SAMPLES); skip (and report) files that cannot be read.

    Returns the audio and the indices of ``paths`` that were kept.
    """
    rows, kept, long, silent = [], [], [], []
    for index, path in enumerate(tqdm(paths, desc=description, unit="clip", leave=False, disable=None)):
        try:
            samples = audio.load(path)
        except audio.AudioError as error:
            tqdm.write(f"skipping {error}", file=sys.stderr)
            continue
        if len(samples) > LONG_CLIP_SAMPLES:
            long.append((path, len(samples) / SAMPLE_RATE))
            samples = around_the_sound(samples)
        # The test package's _silence_ clips are meant to hold none.
        if path.parent.name != SILENCE and not np.abs(samples).max(initial=0.0) >= SILENT_PEAK:
            silent.append(path)
        rows.append(_to_int16(audio.fix_length(samples)))
        kept.append(index)
    if long:
        path, seconds = long[0]
        tqdm.write(
            f"warning: {description} over 1 s long: {len(long)} (the first: {path}, {seconds:.1f} s); the "
            "model takes the second centred on each one's sound, which holds one word only if the rest "
            "is quiet: cut them to 1 s around the word",
            file=sys.stderr,
        )
    if silent:
        tqdm.write(
            f"warning: {description} with no sound in them (peaks under -60 dBFS): {len(silent)} (the "
            f"first: {silent[0]}); an empty take or a muted microphone labels silence as a word: listen "
            "to them, and delete the empty ones from data of your own",
            file=sys.stderr,
        )
    if not rows:
        return np.zeros((0, CLIP_SAMPLES), np.int16), kept
    return np.stack(rows), kept


def _to_int16(samples: np.ndarray) -> np.ndarray:
    # int16 halves memory against float32; the sources are 16-bit recordings anyway.
    return np.round(np.clip(samples, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def to_float(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768.0


def _random_windows(tracks: list[np.ndarray], rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random CLIP_SAMPLES windows of int16 tracks, tracks chosen by length."""
    out = np.zeros((count, CLIP_SAMPLES), np.int16)
    tracks = [track for track in tracks if len(track)]  # a recording of a few samples leaves none to train on
    if count == 0 or not tracks:
        return out
    lengths = np.array([len(t) for t in tracks], dtype=np.float64)
    choice = rng.choice(len(tracks), size=count, p=lengths / lengths.sum())
    for row, index in enumerate(choice):
        track = tracks[index]
        if len(track) <= CLIP_SAMPLES:
            out[row, : len(track)] = track
        else:
            start = rng.integers(0, len(track) - CLIP_SAMPLES + 1)
            out[row] = track[start : start + CLIP_SAMPLES]
    return out


def _load_tracks(paths, description: str) -> dict[Path, np.ndarray]:
    """The recordings that could be read, by path (the others are named and skipped)."""
    tracks = {}
    for path in tqdm(paths, desc=description, unit="file", leave=False, disable=None):
        try:
            tracks[path] = _to_int16(audio.load(path))
        except audio.AudioError as error:
            tqdm.write(f"skipping {error}", file=sys.stderr)
    return tracks


class NoiseBank:
    """Background noise recordings, each split in time: the head for training, the tail held out."""

    def __init__(self, folder: Path, held_out_share: float):
        if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):  # it would look empty
            raise DataError(f"{folder}: no permission to read the folder; check its owner and mode (ls -ld)")
        tracks = _load_tracks(audio.audio_files_under(folder) if folder.is_dir() else [], "noise")
        self.names = [p.name for p in tracks]
        self.parts: dict[str, list[np.ndarray]] = {"training": [], "held_out": []}
        for track in tracks.values():
            cut = int(len(track) * (1 - held_out_share))
            self.parts["training"].append(track[:cut])
            self.parts["held_out"].append(track[cut:])

    def __bool__(self) -> bool:
        return bool(self.parts["training"])

    def windows(self, rng: np.random.Generator, count: int, split: str) -> np.ndarray:
        part = "training" if split == "training" else "held_out"
        return to_float(_random_windows(self.parts[part], rng, count))

    def silence(self, rng: np.random.Generator, count: int, split: str) -> np.ndarray:
        """Noise at every level from near silence (-80 dB) up to the recording's own level."""
        gains = 10.0 ** rng.uniform(-4.0, 0.0, size=(count, 1))
        return (self.windows(rng, count, split) * gains).astype(np.float32)


def _keywords_said(files: list[Path], words: tuple[str, ...]) -> dict[str, str]:
    """Recording name -> the first keyword its transcript says, from LibriSpeech's transcripts
    among ``files`` (SPEAKER-CHAPTER.trans.txt: one "NAME WORDS..." line per recording)."""
    folded = {word.casefold(): word for word in words}
    said = {}
    for path in files:
        if not path.name.endswith(".trans.txt"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            name, _, text = line.partition(" ")
            keyword = next((folded[w] for w in text.casefold().split() if w in folded), None)
            if keyword:
                said[name] = keyword
    return said


class NegativeBank:
    """Continuous speech without keywords (``--negatives``), split by speaker."""

    def __init__(self, folders: list[str], validation_share: float, words: tuple[str, ...] = ()):
        paths, others = [], []
        for folder in folders:
            folder = Path(folder)
            unread = len(others)
            found = audio.audio_files_under(folder, others)
            if not found:
                foreign = _not_transcripts(others[unread:])
                raise DataError(
                    f"--negatives folder {folder} holds no audio files kws reads"
                    + (f" ({_kinds(foreign)}: {audio.CONVERT})" if foreign else "")
                )
            paths += found
        _warn_left_out(f"files in --negatives {', '.join(map(str, folders))}", _not_transcripts(others))
        # Speech that says a keyword would teach the model that the keyword is not one.
        said = _keywords_said(others, words)
        self.left_out = Counter(said[path.stem] for path in paths if path.stem in said)
        kept = [path for path in paths if path.stem not in said]
        if self.left_out:
            tqdm.write(
                f"--negatives: left out {len(paths) - len(kept)} of {len(paths)} recordings, whose "
                f"transcripts say a keyword ({tally(self.left_out)})",
                file=sys.stderr,
            )
        paths = kept
        speakers = sorted({speaker_id(p) for p in paths}, key=speaker_hash)
        held_out = set()
        if len(speakers) > 1 and validation_share > 0:
            held_out = set(speakers[: max(1, round(validation_share * len(speakers)))])
        self.speakers = {
            "training": sorted(set(speakers) - held_out),
            "held_out": sorted(held_out),
        }
        self.tracks = {
            part: list(
                _load_tracks(
                    [p for p in paths if (speaker_id(p) in held_out) == (part == "held_out")],
                    f"negatives ({part})",
                ).values()
            )
            for part in ("training", "held_out")
        }
        named = ", ".join(map(str, folders))
        if not any(self.tracks.values()):
            raise DataError(
                f"--negatives {named}: none of its {len(paths)} audio files could be read "
                "(each is named above)"
            )
        for part, use in (
            ("training", "training"),
            ("held_out", "validation and the real-speech false accepts"),
        ):
            if not self.tracks[part] and (part == "training" or validation_share > 0):
                tqdm.write(
                    f"warning: --negatives {named} leaves no speech for {use}: it holds "
                    f"{len(speakers)} speaker(s); give it several, each in a folder of "
                    "its own (LibriSpeech layout: SPEAKER/CHAPTER/FILE)",
                    file=sys.stderr,
                )

    def has(self, split: str) -> bool:
        """Whether ``split`` has negative speech to draw windows from."""
        return bool(self.tracks[self._part(split)])

    def seconds(self, part: str) -> float:
        return sum(len(t) for t in self.tracks[part]) / SAMPLE_RATE

    def windows(self, rng: np.random.Generator, count: int, split: str) -> np.ndarray:
        return to_float(_random_windows(self.tracks[self._part(split)], rng, count))

    @staticmethod
    def _part(split: str) -> str:
        return "training" if split == "training" else "held_out"


def shift_rows(batch: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Move each row right (positive) or left (negative) by its shift, filling with zeros."""
    out = np.zeros_like(batch)
    width = batch.shape[1]
    for row, shift in enumerate(shifts):
        if abs(shift) >= width:
            continue
        if shift >= 0:
            out[row, shift:] = batch[row, : width - shift]
        else:
            out[row, :shift] = batch[row, -shift:]
    return out


def change_speed(batch: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Play each row ``factor`` times as fast about its centre (linear interpolation, zeros outside)."""
    width = batch.shape[1]
    centre = (width - 1) / 2
    positions = np.arange(width)
    offsets = positions - centre
    out = np.empty_like(batch)
    for row, factor in enumerate(factors):
        out[row] = np.interp(centre + offsets * factor, positions, batch[row], left=0.0, right=0.0)
    return out


def time_shift(batch: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Shift each row by up to +-max_shift samples, filling with zeros."""
    return shift_rows(batch, rng.integers(-max_shift, max_shift + 1, size=len(batch)))


def speech_extent(
    samples: np.ndarray, frame: int = HOP_SAMPLES, floor_db: float = -20.0
) -> tuple[np.ndarray, np.ndarray]:
    """First and last sample of each clip's loud part: frames within floor_db of its loudest frame."""
    frames = samples[:, : samples.shape[1] // frame * frame].astype(np.float32)
    energy = (frames.reshape(len(samples), -1, frame) ** 2).mean(axis=2)
    loud = energy >= energy.max(axis=1, keepdims=True) * 10 ** (floor_db / 10)
    first = loud.argmax(axis=1)
    last = loud.shape[1] - 1 - loud[:, ::-1].argmax(axis=1)
    return first * frame, (last + 1) * frame


CHANNEL_SHAPES = 3


def channel_response(features: np.ndarray, rng: np.random.Generator, db: float) -> np.ndarray:
    """The features of each example as a random microphone would give them (AugmentConfig.channel_db).

    A gain over the mel bands is an offset of the log energies, and an offset shaped like the
    k-th DCT cosine is an offset of MFCC k alone: adding ``a`` to coefficient k adds a cosine of
    amplitude ``a * sqrt(2 / NUM_MEL_BANDS)`` to the log energies (the DCT is orthonormal).
    """
    amplitude = rng.normal(0.0, db * np.log(10) / 10, (len(features), 1, CHANNEL_SHAPES))  # dB -> ln
    out = features.copy()
    out[:, :, 1 : 1 + CHANNEL_SHAPES] += amplitude / np.sqrt(2 / NUM_MEL_BANDS)
    return out


def spec_augment(features: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Zero random bands of frames and of coefficients (SpecAugment's masking)."""
    out = features.copy()
    frames, coefficients = features.shape[1:]
    for row in range(len(out)):
        for _ in range(config.time_masks):
            width = rng.integers(0, config.time_mask_frames + 1)
            start = rng.integers(0, frames - width + 1)
            out[row, start : start + width, :] = 0
        for _ in range(config.freq_masks):
            width = rng.integers(0, config.freq_mask_coefficients + 1)
            start = rng.integers(0, coefficients - width + 1)
            out[row, :, start : start + width] = 0
    return out


def _filler_counts(keyword_count: int, silence_share: float, unknown_share: float) -> tuple[int, int]:
    """How many silence and unknown examples give those shares of the whole set."""
    scale = keyword_count / (1 - silence_share - unknown_share)
    return math.ceil(scale * silence_share), math.ceil(scale * unknown_share)


@dataclass
class SplitClips:
    """The clips of one split, row for row."""

    samples: np.ndarray  # (n, CLIP_SAMPLES) int16
    labels: np.ndarray  # (n,) label indices
    keyword: np.ndarray  # (n,) whether each is a keyword clip
    words: np.ndarray  # (n,) the word of each clip's folder


@dataclass
class EvaluationSet:
    audio: np.ndarray  # (n, CLIP_SAMPLES) float32
    labels: np.ndarray  # (n,) label indices
    sources: np.ndarray  # (n,) "keyword", "other word", "negative speech" or "noise"
    words: np.ndarray  # (n,) the word of each clip's folder, "" for noise and negative speech


EVALUATION_SHARES = (0.1, 0.1)  # _silence_, _unknown_ in validation and test sets
# Sources of examples in an epoch's plan besides clip rows (which are >= 0).
_NEGATIVE = -1
_SILENCE = -2
_PARTIAL = -3
PARTIAL_KEEP = (0.15, 0.5)  # share of a word a partial example keeps
_CHUNK = 2048  # examples augmented at once: bounds memory on the full data set


class SpeechData:
    """The examples of one data folder for one word list; audio is read on first use."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.root = Path(config.data_dir)
        self.labels = labels_for(config.words)
        check_folders(config)
        self.clips = scan(self.root, config.validation_percent, config.testing_percent)
        for folder in config.extra:
            self.clips += scan(Path(folder), split="training")
        self.package = is_test_package(self.root)
        self._loaded: dict[str, SplitClips] = {}
        self._noise: NoiseBank | None = None
        self._negatives: NegativeBank | None = None

    def label_of(self, word: str) -> int:
        return self.labels.index(word if word in self.labels else UNKNOWN)

    @property
    def noise(self) -> NoiseBank:
        if self._noise is None:
            self._noise = NoiseBank(self.root / NOISE_FOLDER, self.config.noise_validation_share)
        return self._noise

    @property
    def negatives(self) -> NegativeBank | None:
        if self._negatives is None and self.config.negatives:
            self._negatives = NegativeBank(
                self.config.negatives, self.config.negatives_validation_share, tuple(self.config.words)
            )
        return self._negatives

    def split_audio(self, split: str) -> SplitClips:
        """Clips of a split: int16 audio, label indices, whether each is a keyword clip, its word."""
        if split not in self._loaded:
            clips = [c for c in self.clips if c.split == split]
            samples, kept = load_clips([c.path for c in clips], f"{split} clips")
            words = np.array([clips[i].word for i in kept], dtype=object)
            labels = np.array([self.label_of(word) for word in words], dtype=np.int64)
            self._loaded[split] = SplitClips(samples, labels, np.isin(words, self.config.words), words)
        return self._loaded[split]

    def _plan(self, split: str, rng: np.random.Generator, evaluation: bool) -> np.ndarray:
        """The examples of one pass: clip rows (keywords, other words), _NEGATIVE, _SILENCE.

        Training draws other-word clips with repeats, a fresh draw each epoch; evaluation
        takes each held-out word clip at most once and fills up with negative speech.
        """
        clips = self.split_audio(split)
        keyword_rows = np.flatnonzero(clips.keyword)
        word_rows = np.flatnonzero(~clips.keyword & (clips.labels == self.label_of(UNKNOWN)))
        # Evaluation keeps the reference composition whatever the training shares, so that
        # accuracies of differently trained models compare (the official test set has it too).
        shares = EVALUATION_SHARES if evaluation else (self.config.silence_share, self.config.unknown_share)
        n_silence, n_unknown = _filler_counts(len(keyword_rows), *shares)
        if not self.noise:
            n_silence = 0
        n_partial = 0 if evaluation else round(n_unknown * self.config.partial_fraction)
        n_unknown -= n_partial
        n_words = n_unknown
        negatives = bool(self.negatives) and self.negatives.has(split)
        if negatives:
            n_words = n_unknown - round(n_unknown * self.config.negatives_fraction)
        if evaluation:
            n_words = min(n_words, len(word_rows))
            words = rng.permutation(word_rows)[:n_words]
        else:
            n_words = n_words if len(word_rows) else 0
            words = rng.choice(word_rows, size=n_words) if n_words else word_rows[:0]
        n_negative = n_unknown - n_words if negatives else 0
        fillers = [
            np.full(n, code)
            for n, code in ((n_negative, _NEGATIVE), (n_silence, _SILENCE), (n_partial, _PARTIAL))
        ]
        return np.concatenate([keyword_rows, words, *fillers])

    def _targets(self, split: str, plan: np.ndarray) -> np.ndarray:
        labels = self.split_audio(split).labels
        targets = np.full(len(plan), self.label_of(UNKNOWN))
        targets[plan == _SILENCE] = self.label_of(SILENCE)
        rows = plan >= 0
        targets[rows] = labels[plan[rows]]
        return targets

    def _render(self, split: str, plan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Audio (n, CLIP_SAMPLES) float32 of planned examples, without augmentation."""
        samples = self.split_audio(split).samples
        out = np.zeros((len(plan), CLIP_SAMPLES), np.float32)
        rows = plan >= 0
        out[rows] = to_float(samples[plan[rows]])
        negative = plan == _NEGATIVE
        if negative.any():
            out[negative] = self.negatives.windows(rng, int(negative.sum()), split)
        silence = plan == _SILENCE
        if silence.any():
            out[silence] = self.noise.silence(rng, int(silence.sum()), split)
        partial = plan == _PARTIAL
        if partial.any():
            out[partial] = self._partial_words(split, rng, int(partial.sum()))
        return out

    def _partial_words(self, split: str, rng: np.random.Generator, count: int) -> np.ndarray:
        """Keyword clips that must not fire: a word cut by the window's edge, keeping only its
        first or last part, or the first half of one keyword joined to the second half of another."""
        split_clips = self.split_audio(split)
        samples, labels = split_clips.samples, split_clips.labels
        rows = np.flatnonzero(split_clips.keyword)
        first, last = speech_extent(samples[rows])
        pick = rng.integers(0, len(rows), size=(count, 2))
        clips = to_float(samples[rows[pick[:, 0]]])
        start, end = first[pick[:, 0]], last[pick[:, 0]]
        keep = (rng.uniform(*PARTIAL_KEEP, size=count) * (end - start)).astype(int)
        mode = rng.integers(0, 3, size=count)
        # head: the word's first `keep` samples end the window; tail: its last `keep` begin it
        shifts = np.where(mode == 0, CLIP_SAMPLES - keep - start, keep - end)
        out = shift_rows(clips, shifts)
        for row in np.flatnonzero(mode == 2):
            a, b = rows[pick[row, 0]], rows[pick[row, 1]]
            if labels[a] == labels[b]:
                continue  # two halves of the same word make that word: keep the cut version
            middle_a = (first[pick[row, 0]] + last[pick[row, 0]]) // 2
            middle_b = (first[pick[row, 1]] + last[pick[row, 1]]) // 2
            joined = np.concatenate([to_float(samples[a, :middle_a]), to_float(samples[b, middle_b:])])
            out[row] = audio.fix_length(joined)
        return out

    def _augment(
        self, batch: np.ndarray, plan: np.ndarray, rng: np.random.Generator, augment: AugmentConfig
    ) -> np.ndarray:
        speech = plan != _SILENCE
        # partial words are placed on purpose: a time shift could bring the whole word back in
        movable = plan[speech] != _PARTIAL
        shifted = batch[speech]
        if augment.speed:
            factors = rng.uniform(1 - augment.speed, 1 + augment.speed, size=len(shifted))
            shifted = change_speed(shifted, factors)
        shifted[movable] = time_shift(shifted[movable], rng, int(augment.time_shift_ms * SAMPLE_RATE / 1000))
        if augment.gain_db:
            shifted *= 10 ** (rng.uniform(-augment.gain_db, augment.gain_db, size=(len(shifted), 1)) / 20)
        if self.noise and augment.noise_probability > 0:
            mixed = rng.random(len(shifted)) < augment.noise_probability
            volume = rng.uniform(0, augment.noise_volume, size=(int(mixed.sum()), 1))
            shifted[mixed] += self.noise.windows(rng, int(mixed.sum()), "training") * volume
        batch[speech] = shifted
        return np.clip(batch, -1.0, 1.0)

    def epoch_examples(self) -> int:
        """How many examples each training epoch holds: each draws them afresh, as many."""
        return len(self._plan("training", np.random.default_rng(0), evaluation=False))

    def training_epoch(
        self, rng: np.random.Generator, augment: AugmentConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        """One shuffled epoch of freshly augmented training features (n, frames, mfcc) and labels."""
        if not self.split_audio("training").keyword.any():
            raise DataError(f"no training clips of the keywords {self.config.words} in {self.root}")
        plan = rng.permutation(self._plan("training", rng, evaluation=False))
        features = np.empty((len(plan), NUM_FRAMES, NUM_MFCC), np.float32)
        for start in range(0, len(plan), _CHUNK):
            part = plan[start : start + _CHUNK]
            batch = self._augment(self._render("training", part, rng), part, rng, augment)
            chunk = mfcc(batch)
            if augment.channel_db:
                chunk = channel_response(chunk, rng, augment.channel_db)
            features[start : start + len(part)] = (
                spec_augment(chunk, rng, augment) if augment.spec_augment else chunk
            )
        return features, self._targets("training", plan)

    def evaluation_set(self, split: str, seed: int = 0) -> EvaluationSet:
        """The fixed examples of a split: its keyword clips plus silence and unknown, 10 % each
        (in the test package: its clips as they are)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        if self.package and split != "testing":
            raise DataError(f"{self.root} is a test set package: every clip is in split 'testing'")
        clips = self.split_audio(split)
        if not len(clips.samples):
            others = ", ".join(f"--split {name}" for name in SPLITS if name not in (split, "training"))
            raise DataError(f"no {split} clips in {self.root}: score another split ({others})")
        if self.package:
            plan = np.arange(len(clips.samples))
            audio_out = to_float(clips.samples)
        else:
            rng = np.random.default_rng(seed)
            plan = self._plan(split, rng, evaluation=True)
            audio_out = self._render(split, plan, rng)
        targets = self._targets(split, plan)
        sources = np.full(len(plan), "noise", dtype=object)
        sources[plan == _NEGATIVE] = "negative speech"
        rows = plan >= 0
        sources[rows] = np.where(clips.keyword[plan[rows]], "keyword", "other word")
        sources[rows & (targets == self.label_of(SILENCE))] = "noise"
        words = np.full(len(plan), "", dtype=object)
        words[rows] = clips.words[plan[rows]]
        return EvaluationSet(audio_out, targets, sources, words)

    def words_without_clips(self, split: str) -> list[str]:
        """The keywords that have no clip in ``split`` that could be read."""
        present = set(self.split_audio(split).words)
        return [word for word in self.config.words if word not in present]

    def summary(self) -> dict:
        """What the data is made of, for config.json."""
        counts = {}
        for split in SPLITS:
            if split in self._loaded:  # the clips that could be read
                labels = self._loaded[split].labels
            else:  # a split a run never reads (test): the clips its folders hold
                labels = np.array([self.label_of(c.word) for c in self.clips if c.split == split], np.int64)
            counts[split] = {label: int((labels == i).sum()) for i, label in enumerate(self.labels)}
        summary = {
            "data_dir": str(self.root.resolve()),
            "layout": "test_package" if self.package else "speech_commands",
            "clips_per_split": counts,
            "noise_files": self.noise.names,
        }
        if self.config.extra:
            # Counted in the training split above too: extra_clips says how much of it is theirs.
            summary["extra"], summary["extra_clips"] = [], {}
            for given in self.config.extra:
                folder = str(Path(given).resolve())
                summary["extra"].append(folder)
                summary["extra_clips"][folder] = dict(
                    Counter(c.word for c in self.clips if c.path.is_relative_to(given))
                )
            made = {folder: Path(folder) / SYNTH_SETTINGS for folder in summary["extra"]}
            synthesized = {
                folder: json.loads(path.read_text()) for folder, path in made.items() if path.exists()
            }
            if synthesized:
                summary["synthesized"] = synthesized
        if self.negatives:
            summary["negatives"] = {
                part: {
                    "speakers": self.negatives.speakers[part],
                    "seconds": round(self.negatives.seconds(part), 1),
                }
                for part in ("training", "held_out")
            }
            if self.negatives.left_out:
                summary["negatives"]["left_out_saying_keywords"] = dict(self.negatives.left_out)
        return summary
