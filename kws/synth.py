"""Synthetic training speech: espeak-ng saying the keywords and hundreds of other words.

The clips are written in the Speech Commands layout (``WORD/SPEAKER_nohash_N.wav``) and are
used for training only (``kws train --extra DIR``). The keywords are synthesized as well as
the other words, at the same rate of voices, so that a synthetic voice is no cue for either
class: a model trained on synthetic negatives alone learned "robot voice = unknown".
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from kws import KwsError, audio
from kws.features import CLIP_SAMPLES, SAMPLE_RATE
from kws.files import emptied_on_failure, write_json

ESPEAK = "espeak-ng"
# espeak-ng's English accents; its mbrola voices need packages Debian does not install with it.
ACCENTS = (
    "en-gb",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# Voice variants left out: no voicing at all, or distorted past any user's voice.
UNLIKE_USERS = {"Demonic", "whisper", "whisperf"}
PITCH = (15, 85)  # espeak-ng's 0-99 scale
WORDS_PER_MINUTE = (110, 230)
# RMS of the word, drawn from the 5th to 95th percentile of real keyword clips' RMS (theirs is
# over the whole second, so the synthetic clips come out a few dB quieter: within the spread).
LEVEL_DB = (-38.0, -17.0)
# Speech Commands' other words, the confusable ones first, then everyday words of one or two
# syllables: the words a keyword model hears most that it was never told about.
OTHER_WORDS = """
on off of oh owe toe so sow low snow nose now new cup pup top hop shop drop pop op
yet yeah guess less mess chess dress bless yell yellow lift laughed loft
night light kite bright white fight might sight bite rice ride red read bread
stock stab step stuff stoop store stone star steel stay stair start
goat girl glow grow gold good get gone got gum gave game
town gown crown clown round sound found ground brown drown dawn don done dove
bed bird cat dog eight five four happy house marvin nine one seven sheila six three tree two
wow zero learn follow forward visual backward
apple water paper table window garden music number person people money
quick slow fast hot cold warm open close begin finish dark high
hello goodbye please thank sorry maybe never always often again
hat bat mat rat fat sat pat log fog frog hog jog
ten eleven twelve twenty thirty hundred thousand million
monday tuesday friday sunday morning evening today tomorrow yesterday
blue green black purple orange pink gray silver
mother father sister brother friend child baby doctor teacher
home room door floor wall roof car bus train plane boat ship
tea coffee milk cheese meat fish soup cake
sad angry tired hungry thirsty sleepy busy
dance sing play walk run jump swim fly drive
above under over behind beside between inside outside
lamp desk chair couch pillow blanket mirror clock phone
moon sun cloud rain wind storm thunder
map key box bag plate fork knife spoon bowl
ok okay alright sure fine great cool nice
""".split()
# Words espeak-ng says alike: a keyword's other-word clips would teach the model its own sound as
# _unknown_. Each group holds for every word in it.
HOMOPHONES = (
    {"no", "know"},
    {"right", "write", "rite", "wright"},
    {"two", "to", "too"},
    {"four", "for"},
    {"okay", "ok"},
    {"son", "sun"},
    {"new", "knew"},
)


# Beside the clips: what made them, which a run trained with --extra records.
SETTINGS_FILE = "synth.json"


class SynthError(KwsError, RuntimeError):
    """Synthesis cannot run; the message says what to install or change."""


@dataclass
class SynthConfig:
    """How many clips ``kws synth`` makes, and from which seed.

    The defaults are the dose that kept clip accuracy with words left out of the data
    (docs/model_variants.md): four times as many cost 0.7-1.4 points of it, for about as much
    rejection of words never heard. With every word present, even this dose cost 0.25 points.
    """

    per_keyword: int = 100
    per_other_word: int = 2
    seed: int = 0
    # Words that sound like the keywords (OTHER_WORDS holds those of the built-in ones): the
    # other words a model most needs to hear, so each gets as many clips as a keyword.
    sound_alikes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    pitch: int
    words_per_minute: int

    @property
    def speaker(self) -> str:
        """A speaker id for the dataset's ``SPEAKER_nohash_N`` file names."""
        key = f"{self.accent}+{self.variant}/{self.pitch}/{self.words_per_minute}"
        return "espeak" + hashlib.sha1(key.encode()).hexdigest()[:8]


def variants() -> list[str]:
    """espeak-ng's voice variants (men, women, old, whispering, ...) on this machine."""
    if shutil.which(ESPEAK) is None:
        raise SynthError(f"{ESPEAK} is not installed: install it (Debian/Ubuntu: apt-get install espeak-ng)")
    listing = subprocess.run([ESPEAK, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    # Rows: Pty Language Age/Gender VoiceName File; the file is "!v/NAME".
    names = (row.split()[4].removeprefix("!v/") for row in listing.splitlines()[1:] if row.strip())
    return sorted(set(names) - UNLIKE_USERS)


def _said_as(keywords: Iterable[str]) -> set[str]:
    """The keywords and the words espeak-ng says alike, case-folded."""
    keywords = {word.casefold() for word in keywords}
    return keywords.union(*(group for group in HOMOPHONES if group & keywords))


def other_words(keywords: Iterable[str], sound_alikes: Iterable[str] = ()) -> list[str]:
    """OTHER_WORDS without the keywords, words said like them, and ``sound_alikes`` (which get
    clips of their own)."""
    excluded = _said_as(keywords) | {word.casefold() for word in sound_alikes}
    return [word for word in dict.fromkeys(OTHER_WORDS) if word.casefold() not in excluded]


def check_sound_alikes(keywords: Iterable[str], sound_alikes: Iterable[str]) -> None:
    """SynthError for a sound-alike that is a keyword or said as one: its clips would teach the
    model that the keyword is not one."""
    said = _said_as(keywords)
    for word in sound_alikes:
        if word.casefold() in said:
            raise SynthError(
                f"--sound-alikes {word!r} is a keyword or is said as one: leave it out of --sound-alikes"
            )


def say(word: str, voice: Voice) -> np.ndarray:
    """espeak-ng's speech of ``word`` as float32 samples at SAMPLE_RATE."""
    command = [
        ESPEAK,
        "--stdout",
        "-v",
        f"{voice.accent}+{voice.variant}",
        "-p",
        str(voice.pitch),
        "-s",
        str(voice.words_per_minute),
        "--stdin",
    ]
    # The word goes in on stdin, where a word starting with "-" cannot be taken for an option.
    result = subprocess.run(command, input=word.encode(), capture_output=True)
    if result.returncode:
        reason = result.stderr.decode(errors="replace").strip()
        raise SynthError(f"{ESPEAK} could not say {word!r} as {voice.accent}+{voice.variant}: {reason}")
    return audio.decode(result.stdout, f"{ESPEAK} {word!r}")


def place(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 1 s clip: the speech's silence trimmed, the word near the middle, at a real clip's level."""
    loud = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max(initial=0.0))
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    if not len(loud):
        return clip
    speech = speech[loud[0] : loud[-1] + 1][:CLIP_SAMPLES]
    # Halfway between a random start and the centre: words sit near the middle, as recorded ones do.
    spare = CLIP_SAMPLES - len(speech)
    start = (int(rng.integers(0, spare + 1)) + spare // 2) // 2
    clip[start : start + len(speech)] = speech
    rms = np.sqrt(np.mean(speech.astype(np.float64) ** 2))
    clip *= 10 ** (rng.uniform(*LEVEL_DB) / 20) / max(rms, 1e-6)
    return np.clip(clip, -1.0, 1.0)


def _voice(rng: np.random.Generator, names: list[str]) -> Voice:
    return Voice(
        accent=ACCENTS[rng.integers(len(ACCENTS))],
        variant=names[rng.integers(len(names))],
        pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
        words_per_minute=int(rng.integers(WORDS_PER_MINUTE[0], WORDS_PER_MINUTE[1] + 1)),
    )


def synthesize(keywords: list[str], out: Path, config: SynthConfig) -> int:
    """Write ``per_keyword`` clips of each keyword and sound-alike and ``per_other_word`` of each
    other word into ``out``; returns the number of clips. Each clip has its own voice, drawn from
    ``config.seed``."""
    check_sound_alikes(keywords, config.sound_alikes)
    names = variants()
    plan = [(word, config.per_keyword) for word in [*keywords, *dict.fromkeys(config.sound_alikes)]]
    plan += [(word, config.per_other_word) for word in other_words(keywords, config.sound_alikes)]
    tasks = [(word, index) for word, count in plan for index in range(count)]

    def write(task: tuple[str, int]) -> None:
        word, index = task
        # Each clip's own seed, so that a clip does not change when others are added.
        rng = np.random.default_rng([config.seed, index, *word.encode()])
        voice = _voice(rng, names)
        clip = place(say(word, voice), rng)
        sf.write(out / word / f"{voice.speaker}_nohash_{index}.wav", clip, SAMPLE_RATE, subtype="PCM_16")

    # An interrupted run leaves no clips behind, that a later training could take for all of them.
    with emptied_on_failure(out):
        for word, _ in plan:
            (out / word).mkdir(exist_ok=True)
        # espeak-ng runs as its own process: threads are enough to keep every core busy.
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            for _ in tqdm(
                pool.map(write, tasks), total=len(tasks), desc="synthesizing", unit="clip", disable=None
            ):
                pass
        version = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True).stdout
        settings = {"keywords": keywords, **asdict(config), "clips": len(tasks)}
        write_json(out / SETTINGS_FILE, {**settings, "espeak_ng": version.split("Data at")[0].strip()})
    return len(tasks)
