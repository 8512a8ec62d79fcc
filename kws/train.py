"""Training a DS-CNN run: fresh augmented epochs, stepped learning rate, checkpoints, best model, plots.

A run folder holds:
  config.json            frontend, labels, data, augmentation, model and training settings
  model.keras            the best model by validation accuracy
  checkpoints/           the last epochs (model + optimizer, and their history) for --resume
  metrics.json           history, best epoch, validation report, parameters, MACs, time
  training_curves.png    loss and accuracy per epoch
  confusion_validation.png
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kws import KwsError, audio, features, plots
from kws.data import (
    NOISE_FOLDER,
    SPLIT_LISTS,
    SPLITS,
    AugmentConfig,
    DataConfig,
    DataError,
    SpeechData,
    check_keyword_folders,
    labels_for,
    speakers_on_both_sides,
    word_folders,
)
from kws.evaluate import FEW_CLIPS, clip_counts, few_clips, report
from kws.files import atomic_path, write_files, write_json
from kws.model import ModelConfig, build, count_macs, load_keras
from kws.runtime import CONFIG_FILE, MODEL_FILE, ModelError, model_digest
from kws.stream import SILENCE, UNKNOWN

# TensorFlow's C++ logging hides our output, and says "CUDA error" on every machine without a GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

METRICS_FILE = "metrics.json"
# A keyword with under this share of a typical keyword's training clips is warned of.
SCARCE_SHARE = 0.1
# Fewer optimizer steps than this are warned of. On 26 clips of three own words (one batch an
# epoch), the default 40 epochs left a model at 30 % validation accuracy, and 200 got every
# validation example right; the built-in model's recipe takes 14,400 (144 batches, 100 epochs).
FEW_STEPS = 200
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    """The optimisation recipe: Adam, batch 100, the learning rate stepped down at 1/3 and 2/3.

    The reference recipe's 5e-4 -> 1e-4 -> 2e-5 assumes 30,000 steps; in the ~3,600 steps of
    40 epochs on the 8-keyword subset it stalls at 91.9 % validation accuracy, while six times
    those rates reach 93.8 %.
    """

    epochs: int = 40
    batch_size: int = 100
    # Used for the first, second and last third of the epochs.
    learning_rates: tuple[float, float, float] = (3e-3, 1e-3, 2e-4)
    seed: int = 0
    # Above 0: the weights end each epoch as their moving average over its last steps
    # (Keras' Adam use_ema, applied when each epoch's fit ends), 0.99 ~ the last 100 steps.
    ema_momentum: float = 0.0
    # Run folders of trained models with the same labels and frontend: their averaged
    # probabilities on each augmented example make up teacher_weight of its target, the
    # one-hot label the rest (knowledge distillation: an ensemble's knowledge in one small model).
    teachers: tuple[str, ...] = ()
    teacher_weight: float = 0.5

    def __post_init__(self):
        self.learning_rates = tuple(self.learning_rates)
        self.teachers = tuple(self.teachers)
        if not 0 <= self.teacher_weight <= 1:
            raise ValueError(f"teacher_weight must be from 0 to 1, got {self.teacher_weight}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be from 0 to 2**32 - 1, got {self.seed}")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must be from 0 to below 1, got {self.ema_momentum}")

    def learning_rate(self, epoch: int) -> float:
        """Learning rate of a 0-based epoch."""
        step = min(len(self.learning_rates) - 1, epoch * len(self.learning_rates) // self.epochs)
        return self.learning_rates[step]


@dataclass
class RunConfig:
    """Everything that defines a trained model; saved as config.json in its run folder."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    frontend: dict = field(default_factory=features.describe)
    data_summary: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return labels_for(self.data.words)

    def to_dict(self) -> dict:
        return {"labels": self.labels, **asdict(self)}

    def data_record(self) -> dict:
        """What the model was trained on, as a manifest's ``training`` records it: eval and
        calibrate split the data again from it, and warn where the split moved."""
        return {
            "data": asdict(self.data),
            "clips_per_split": self.data_summary.get("clips_per_split", {}),
            "negatives": self.data_summary.get("negatives", {}),
            "extra_clips": self.data_summary.get("extra_clips", {}),
            "noise_files": self.data_summary.get("noise_files"),
            "warnings": self.data_summary.get("warnings", []),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        return cls(
            data=DataConfig(**raw["data"]),
            model=ModelConfig(**raw["model"]),
            train=TrainConfig(**raw["train"]),
            augment=AugmentConfig(**raw["augment"]),
            frontend=raw["frontend"],
            data_summary=raw.get("data_summary", {}),
        )

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        path = Path(run_dir) / CONFIG_FILE
        if not Path(run_dir).exists():
            raise FileNotFoundError(f"run folder {run_dir} does not exist")
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} is not a kws run folder: it has no {CONFIG_FILE}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"is not valid JSON ({error})"
        except KeyError as error:
            problem = f"has no {error} settings"
        except (TypeError, ValueError) as error:  # a setting of the wrong kind, or out of range
            problem = f"holds settings kws cannot use ({error})"
        raise ModelError(
            f"{path} {problem}: `kws train` writes it; restore the run's copy, or train a new run"
        ) from None


def _batch_progress(total: int, description: str):
    """A Keras callback that draws one epoch's batches as a tqdm bar with loss and accuracy."""
    import keras

    class BatchProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            # Passing bars only on a terminal (disable=None): in a log they are noise.
            self.bar = tqdm(total=total, desc=description, unit="batch", leave=False, disable=None)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.3f}")

        def on_epoch_end(self, epoch, logs=None):
            self.bar.close()

    return BatchProgress()


def _cross_entropy(probabilities: np.ndarray, targets: np.ndarray) -> float:
    picked = probabilities[np.arange(len(targets)), targets]
    return float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())


def _check_teachers(config: RunConfig) -> None:
    """ModelError unless each teacher is a trained run of this run's labels: checked before Keras
    loads, so that a mistyped --teacher is told at once."""
    for folder in config.train.teachers:
        try:
            labels = trained_run(Path(folder)).labels
        except FileNotFoundError as error:
            raise ModelError(f"teacher {folder}: {error}") from None
        if sorted(labels) != sorted(config.labels):
            raise ModelError(
                f"teacher {folder} has the labels {labels}, this run {config.labels}: "
                "a teacher must be trained on the same words"
            )


def _load_teachers(config: RunConfig) -> list[tuple[KerasClassifier, list[int]]]:
    """Each teacher run, and which of its scores is each of this run's labels (a teacher may
    have been given the same words in another order)."""
    teachers = [KerasClassifier(Path(folder)) for folder in config.train.teachers]
    return [(teacher, [teacher.labels.index(label) for label in config.labels]) for teacher in teachers]


def _targets(batch: np.ndarray, labels: np.ndarray, teachers: list, config: RunConfig) -> np.ndarray:
    """Each example's target distribution: its one-hot label, mixed with the teachers' mean probabilities."""
    one_hot = np.eye(len(config.labels), dtype=np.float32)[labels]
    if not teachers:
        return one_hot
    taught = np.mean([teacher.scores(batch)[:, columns] for teacher, columns in teachers], axis=0)
    weight = config.train.teacher_weight
    return (1 - weight) * one_hot + weight * taught


def _seed_states(model) -> list:
    """The states of the model's random streams (its Dropout layers' seed generators), which a
    saved .keras file does not keep: restored on --resume, they draw what the run would have."""
    return [variable for variable in model.variables if variable.path.endswith("seed_generator_state")]


def _save_checkpoint(run_dir: Path, model, state: dict) -> None:
    folder = run_dir / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    name = f"epoch-{state['epochs_done']:04d}"
    with atomic_path(folder / f"{name}.keras") as tmp:
        model.save(tmp)
    state = {**state, "seed_states": [variable.numpy().tolist() for variable in _seed_states(model)]}
    write_json(folder / f"{name}.json", state)  # written last: marks the checkpoint complete
    for old in sorted(folder.glob("epoch-*.json"))[:-KEEP_CHECKPOINTS]:
        old.with_suffix(".keras").unlink(missing_ok=True)
        old.unlink()


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The last complete checkpoint of a run: its model file and its state (epochs_done,
    best_epoch, history, ...); None before the first epoch ends."""
    for state_file in sorted((run_dir / CHECKPOINTS).glob("epoch-*.json"), reverse=True):
        model_file = state_file.with_suffix(".keras")
        if model_file.exists() and (state := _checkpoint_state(state_file)) is not None:
            return model_file, state
    return None


def _checkpoint_state(state_file: Path) -> dict | None:
    """A checkpoint's state, or None (with a warning) if the file was damaged."""
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None
    if isinstance(state, dict) and {"epochs_done", "best_epoch"} <= state.keys():
        return state
    tqdm.write(
        f"warning: skipping the damaged checkpoint {state_file}: it is not the state kws wrote",
        file=sys.stderr,
    )
    return None


def _why_no_clips(data: SpeechData, word: str) -> tuple[str, bool]:
    """Why a keyword whose folder exists (check_keyword_folders) has no training clip, and
    whether the split put its clips elsewhere (rather than there being none to read)."""
    folders = [folder for folder in word_folders(data.config, word) if folder.is_dir()]
    if not any(audio.audio_files_under(folder) for folder in folders):
        where = " and ".join(map(str, folders))
        return (
            f"{where} hold{'s' * (len(folders) == 1)} no audio files kws reads ({audio.AUDIO_SUFFIX_TEXT})",
            False,
        )
    folder = folders[0]
    unread = sum(clip.word == word and clip.split == "training" for clip in data.clips)
    if unread:
        return f"none of the {unread} training clips in {folder} could be read (each is named above)", False
    clips = [clip for clip in data.clips if clip.word == word]
    splits = Counter(clip.split for clip in clips)
    placed = f"every clip in {folder} is in validation ({splits['validation']}) or test ({splits['testing']})"
    speaker = _one_speaker(clip for clip in clips if clip.hashed)
    if speaker:
        return f"{placed}: the clips no split list names are all one speaker's ({speaker})", True
    return f"{placed}, by the split lists or by the speaker hash", True


def _one_speaker(clips) -> str | None:
    """The speaker of ``clips`` if they are all one named speaker's, else None."""
    speakers = {clip.speaker for clip in clips}
    return next(iter(speakers)) if len(speakers) == 1 and None not in speakers else None


def _one_voice(data: SpeechData) -> str:
    """What to do when the speaker hash puts all of one speaker's clips in one split."""
    return (
        "the speaker hash puts each speaker's clips (named before _nohash_, else by their subfolder) "
        "in one split: record more speakers; or, to train on one voice, name its files without "
        "_nohash_ and put them directly in the words' folders, so that each clip is split on its own, "
        f"{data.config.validation_percent:g} % to validation"
    )


def _checked_validation(data: SpeechData, train: TrainConfig):
    """The validation set of data a run can learn from, and a warning (printed, and returned for
    the run's record) for each gap that would leave the model untested, deaf to something or
    untrained; DataError if it cannot learn."""
    warnings = []

    def warn(text: str) -> None:
        warnings.append(text)
        tqdm.write(f"warning: {text}", file=sys.stderr)

    if data.package:
        raise DataError(
            f"{data.root} has a {SILENCE} or {UNKNOWN} folder, so it reads as the official test set "
            "package, whose every clip is a test clip: rename that folder to train on this data"
        )
    unheard = data.words_without_clips("training")
    if unheard:
        reasons, split_away = zip(*(_why_no_clips(data, word) for word in unheard), strict=True)
        advice = f". As {_one_voice(data)}" if any(split_away) else ""  # once, for every word it fits
        words = ", ".join(map(repr, unheard))
        raise DataError(f"no training clips of {words} in {data.root}: {'; '.join(reasons)}{advice}")
    training = data.split_audio("training")
    unread = {
        split: sum(clip.split == split for clip in data.clips) - len(data.split_audio(split).words)
        for split in ("training", "validation")
    }
    if any(unread.values()):
        warn(
            f"clips left out as unreadable: {unread['training']} of the training clips, "
            f"{unread['validation']} of the validation clips",
        )
    heard = Counter(training.words)
    typical = float(np.median([heard[word] for word in data.config.words]))
    scarce = {word: heard[word] for word in data.config.words if heard[word] < SCARCE_SHARE * typical}
    if scarce:
        warn(
            f"few training clips of {clip_counts(scarce)} against {typical:g} for a "
            "typical keyword: the model will seldom hear them and may never spot them; add clips of "
            "them, or leave them out of --words",
        )
    few = few_clips({word: heard[word] for word in data.config.words if word not in scarce})
    if few:
        warn(
            f"few training clips of {clip_counts(few)}: a model learns a word from hundreds of clips in "
            f"many voices (Speech Commands has thousands of each), and from under {FEW_CLIPS} it may never "
            "spot it; record more, or add synthetic ones (kws synth, then --extra)",
        )
    own = [clip for clip in data.clips if clip.path.is_relative_to(data.root)]  # not --extra's
    spoken = [clip for clip in own if clip.word in data.config.words]
    if not data.split_audio("validation").keyword.any():
        hashed = {clip.speaker for clip in spoken if clip.hashed}
        found = (
            f" (it found {len(hashed)}: {', '.join(sorted(hashed))})"
            if None not in hashed and 0 < len(hashed) <= 3
            else ""
        )
        raise DataError(
            f"no validation clips of any keyword in {data.root}: name some in its validation_list.txt "
            f"(lines WORD/PATH below it), or give it more speakers, as {_one_voice(data)}{found}"
        )
    validated = Counter(data.split_audio("validation").words)
    thin = few_clips({word: validated[word] for word in data.config.words})
    if thin:
        warn(
            f"few validation clips of {clip_counts(thin)}: one clip moves a keyword's "
            f"accuracy by over 5 points, and the best epoch is chosen on them; name {FEW_CLIPS} or more "
            "of each, from several speakers, in validation_list.txt",
        )
    untested = data.words_without_clips("validation")
    if untested:
        warn(
            f"no validation clips of {', '.join(map(repr, untested))}: "
            + (
                "its accuracy goes unmeasured and `kws export` cannot calibrate its threshold"
                if len(untested) == 1
                else "their accuracy goes unmeasured and `kws export` cannot calibrate their thresholds"
            )
            + "; name some clips of each in validation_list.txt",
        )
    # Clips the hash put in validation with no speaker in their name: each is a speaker of its own.
    unnamed = sorted({c.word for c in own if c.hashed and c.split == "validation" and c.speaker is None})
    if unnamed:
        listed = (data.root / SPLIT_LISTS["validation"]).exists()
        folders = ", ".join(f"{word}/" for word in unnamed[:3]) + (
            f" and {len(unnamed) - 3} more" if len(unnamed) > 3 else ""
        )
        warn(
            f"the file names in {folders} of {data.root} do not say their speaker "
            "(SPEAKER_nohash_N.wav), so each clip "
            + (f"that {SPLIT_LISTS['validation']} does not name " if listed else "")
            + "is split as a speaker of its own: one person's takes land in training and in "
            "validation, and validation accuracy reads higher than new voices will find; name the "
            "files by speaker, or put each speaker's in a folder of its own (a model of one voice "
            "can only be validated on that voice: then this is as meant)",
        )
    voice = _one_speaker(spoken)
    if voice:  # the one voice there is trains and validates: nothing to list otherwise
        warn(
            f"every keyword clip of {data.root} is one speaker's ({voice}): validation hears the voice "
            "the model trained on, so its accuracy reads higher than other voices will find",
        )
    for split, split_list in SPLIT_LISTS.items():
        straddling = {} if voice else speakers_on_both_sides(own, split)
        if straddling:
            speaker, (heard, trained) = next(iter(straddling.items()))
            warn(
                f"{len(straddling)} speaker{'s' * (len(straddling) > 1)} of {data.root} "
                f"{'have' if len(straddling) > 1 else 'has'} clips in {split} and in training (as "
                f"{speaker}: {heard.path.relative_to(data.root).as_posix()} in {split}, "
                f"{trained.path.relative_to(data.root).as_posix()} in training), as {split_list} names "
                "only some of their clips: the model hears their voices in training, so "
                f"{split.removesuffix('ing')} accuracy reads a little high; list all of a speaker's clips "
                "or none",
            )
    if not data.noise:
        # Noise in a folder of another name is skipped (_background_noise) or read as other words.
        misnamed = sorted(
            folder.name
            for folder in data.root.iterdir()
            if folder.is_dir()
            and "noise" in folder.name.casefold()
            and folder.name not in (NOISE_FOLDER, *data.config.words)
        )
        warn(
            f"no background noise in {data.root / NOISE_FOLDER}: the model learns no _silence_ "
            "and hears no noise in training; put noise recordings there (Speech Commands' six, or your "
            "own rooms')"
            + (
                f"; {', '.join(f'{name}/' for name in misnamed)} is not that folder (a folder starting "
                "with _ is skipped, any other is read as other words, _unknown_): move its recordings"
                if misnamed
                else ""
            ),
        )
    if training.keyword.all() and not data.negatives:
        warn(
            "no other words and no --negatives: the model learns no _unknown_ and will take "
            f"any word for a keyword; add folders of other words to {data.root}, or speech without "
            "the keywords with --negatives (LibriSpeech)",
        )
    steps = _few_steps(train, data.epoch_examples())
    if steps:
        warn(steps)
    return data.evaluation_set("validation"), warnings


def _clips_per_split(data: SpeechData) -> str:
    """One line of each word's clips in training, validation and test, as the lists and the
    speaker hash placed them: a split that took more than meant shows before the checks and
    the minutes of work."""
    words = data.config.words
    counts = {split: Counter() for split in SPLITS}
    for clip in data.clips:
        counts[clip.split][clip.word if clip.word in words else UNKNOWN] += 1
    names = {**{word: word for word in words}, UNKNOWN: "other words"}
    placed = ", ".join(f"{name} {_placed(counts, word)}" for word, name in names.items())
    return f"clips found in training/validation/test: {placed}"


def _moved_clips(before: dict, now: dict) -> str:
    """The labels whose clips per split differ between two records ("yes 28/5/7 -> 26/7/7"), or ""."""
    labels = dict.fromkeys([*before.get("training", {}), *now.get("training", {})])
    changed = [label for label in labels if _placed(before, label) != _placed(now, label)]
    return ", ".join(f"{label} {_placed(before, label)} -> {_placed(now, label)}" for label in changed)


def _placed(counts: dict, label: str) -> str:
    """A label's clips in training, validation and test, from split -> label -> count: "28/5/7"."""
    return "/".join(str(counts.get(split, {}).get(label, 0)) for split in SPLITS)


def _few_steps(train: TrainConfig, examples: int) -> str | None:
    """A warning if the run takes fewer than FEW_STEPS optimizer steps: an epoch is one pass over
    the examples, and a few clips make an epoch of a batch or two."""
    batches = -(-examples // train.batch_size)
    if train.epochs * batches >= FEW_STEPS:
        return None
    return (
        f"{train.epochs} epoch{'s' * (train.epochs != 1)} of {examples} examples make only "
        f"{train.epochs * batches} training "
        f"steps (batches of {train.batch_size}), too few for the model to learn: it may end up "
        f"labelling everything as one class; train with --epochs {-(-FEW_STEPS // batches)} or more"
    )


def train(config: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train (or continue) the run in ``run_dir``; return its metrics."""
    # What a mistyped option breaks is told before TensorFlow loads and the clips are read.
    check_keyword_folders(config.data)
    _check_teachers(config)
    keras = load_keras()

    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint and config.train.epochs < checkpoint[1]["epochs_done"]:
        done = checkpoint[1]["epochs_done"]
        raise KwsError(f"{run_dir} has trained {done} epochs already: resume it with --epochs {done} or more")
    finished = checkpoint and checkpoint[1]["epochs_done"] == config.train.epochs and _metrics_of(run_dir)
    if finished and len(finished.get("history", [])) == config.train.epochs:
        # Its results stand, and reading the data again to say so would take minutes.
        tqdm.write(
            f"{run_dir} has trained all its {config.train.epochs} epochs already; --epochs N (over "
            f"{config.train.epochs}) trains it further",
            file=sys.stderr,
        )
        return finished
    # Teachers and data load before the run folder exists: refusing either leaves no folder behind.
    teachers = _load_teachers(config)
    data = SpeechData(config.data)
    tqdm.write(_clips_per_split(data), file=sys.stderr)
    validation, warnings = _checked_validation(data, config.train)
    val_features = features.mfcc(validation.audio)
    before = config.data_summary.get("clips_per_split")
    config.data_summary = {**data.summary(), "warnings": warnings}
    moved = _moved_clips(before, config.data_summary["clips_per_split"]) if checkpoint and before else ""
    if moved:  # edited split lists, added clips, or a kws that splits speakers otherwise
        tqdm.write(
            f"warning: the data splits otherwise than when {run_dir} started (training/validation/test: "
            f"{moved}): the model goes on with other clips, and validation may hold clips it trained "
            "on; give the data the split lists it started with, or train a new run",
            file=sys.stderr,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, config.to_dict())

    if checkpoint:
        model, state = _resumed(*checkpoint)
        tqdm.write(f"resuming {run_dir} after epoch {state['epochs_done']}")
    else:
        model = _new_model(config)
        state = {
            "epochs_done": 0,
            "history": [],
            "best_accuracy": -1.0,
            "best_val_loss": np.inf,
            "best_epoch": 0,
            "seconds": 0.0,
        }

    def epoch_data(epoch: int):
        rng = np.random.default_rng([config.train.seed, epoch])
        return data.training_epoch(rng, config.augment)

    epochs = tqdm(
        range(state["epochs_done"], config.train.epochs),
        initial=state["epochs_done"],
        total=config.train.epochs,
        desc="epochs",
        unit="epoch",
    )
    # The next epoch's examples are augmented on a second thread while this one trains.
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(epoch_data, state["epochs_done"])
        for epoch in epochs:
            started = time.perf_counter()
            train_features, train_labels = upcoming.result()
            if epoch + 1 < config.train.epochs:
                upcoming = prefetch.submit(epoch_data, epoch + 1)
            keras.utils.set_random_seed(config.train.seed + epoch)
            targets = _targets(train_features, train_labels, teachers, config)
            row = _fit_epoch(model, epoch, train_features, targets, validation.labels, val_features, config)
            state["seconds"] += time.perf_counter() - started
            state["history"].append({**row, "seconds": round(time.perf_counter() - started, 2)})
            _keep_if_best(run_dir, model, state, row)
            state["epochs_done"] = epoch + 1
            _save_checkpoint(run_dir, model, state)
            epochs.set_postfix(val_acc=f"{row['val_accuracy']:.2%}", best=f"{state['best_accuracy']:.2%}")
    return _final_metrics(run_dir, config, state, validation, val_features)


def _metrics_of(run_dir: Path) -> dict | None:
    """The run's metrics.json, None where there is none to read. A run stopped between its last
    checkpoint and its metrics has older ones: their history is shorter than its epochs."""
    try:
        return json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _fit_epoch(model, epoch: int, examples, targets, val_labels, val_features, config: RunConfig) -> dict:
    """One pass over an epoch's examples, then the validation set: the epoch's row of history."""
    model.optimizer.learning_rate.assign(config.train.learning_rate(epoch))
    batches = -(-len(targets) // config.train.batch_size)
    fit = model.fit(
        examples,
        targets,
        batch_size=config.train.batch_size,
        epochs=1,
        shuffle=False,  # training_epoch already shuffled
        verbose=0,
        callbacks=[_batch_progress(batches, f"epoch {epoch + 1}")],
    )
    probabilities = model.predict(val_features, batch_size=1000, verbose=0)
    return {
        "epoch": epoch + 1,
        "learning_rate": config.train.learning_rate(epoch),
        "loss": float(fit.history["loss"][-1]),
        "accuracy": float(fit.history["accuracy"][-1]),
        "val_loss": _cross_entropy(probabilities, val_labels),
        "val_accuracy": float((probabilities.argmax(axis=1) == val_labels).mean()),
    }


def _keep_if_best(run_dir: Path, model, state: dict, row: dict) -> None:
    """Save the model as the run's model.keras if this epoch is the best so far. Of epochs
    equally accurate (a small validation set reaches 100 % early), the surest: the lowest loss."""
    if (row["val_accuracy"], -row["val_loss"]) > (state["best_accuracy"], -state["best_val_loss"]):
        state["best_accuracy"], state["best_epoch"] = row["val_accuracy"], row["epoch"]
        state["best_val_loss"] = row["val_loss"]
        with atomic_path(run_dir / MODEL_FILE) as tmp:
            model.save(tmp)


def _new_model(config: RunConfig):
    import keras

    keras.utils.set_random_seed(config.train.seed)
    model = build(config.model, len(config.labels))
    model.compile(
        optimizer=keras.optimizers.Adam(
            config.train.learning_rates[0],
            use_ema=config.train.ema_momentum > 0,
            ema_momentum=config.train.ema_momentum,
        ),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def _resumed(model_file: Path, state: dict):
    """The checkpoint's model, with the random generators' states it was saved with, and its state."""
    import keras

    model = keras.models.load_model(model_file)
    for variable, value in zip(_seed_states(model), state.pop("seed_states", []), strict=False):
        variable.assign(np.array(value, dtype=variable.dtype))
    if "best_val_loss" not in state:  # checkpoints from before ties were broken by the loss
        state["best_val_loss"] = state["history"][state["best_epoch"] - 1]["val_loss"]
    return model, state


def _final_metrics(run_dir: Path, config: RunConfig, state: dict, validation, val_features) -> dict:
    """metrics.json and the plots, from the best epoch's model."""
    import keras

    best = keras.models.load_model(run_dir / MODEL_FILE)
    predictions = best.predict(val_features, batch_size=1000, verbose=0).argmax(axis=1)
    validation_report = report(
        config.labels, validation.labels, predictions, validation.sources, validation.words
    )
    metrics = {
        "best_epoch": state["best_epoch"],
        "validation": validation_report,
        "parameters": int(best.count_params()),
        "macs": count_macs(best),
        "training_seconds": round(state["seconds"], 1),
        "history": state["history"],
    }
    write_json(run_dir / METRICS_FILE, metrics)
    write_files(
        run_dir,
        {
            "training_curves.png": plots.training_curves(state["history"]),
            "confusion_validation.png": plots.confusion(validation_report, "validation"),
        },
    )
    return metrics


def trained_run(run_dir: Path) -> RunConfig:
    """The config of a run with a trained model for this kws's frontend: checked before Keras
    loads, which takes seconds."""
    config = RunConfig.load(run_dir)
    features.check_compatible(config.frontend, str(run_dir))
    if not (run_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"{run_dir} has no {MODEL_FILE} yet: train at least one epoch")
    return config


def load_trained(run_dir: Path, config: RunConfig):
    """A run's Keras model and the SHA-256 of the very bytes loaded (training may replace the file
    meanwhile): the digest tells later whether the run's model is still the one exported."""
    keras = load_keras()

    path = run_dir / MODEL_FILE
    content = path.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / MODEL_FILE
        copy.write_bytes(content)
        try:
            model = keras.models.load_model(copy, compile=False)
        except Exception as error:  # Keras raises several types for a damaged file; its words name the copy
            raise ModelError(
                f"{path} is not a readable Keras model ({type(error).__name__}): restore it, or retrain "
                f"(`kws train --resume {run_dir}` goes on from its last checkpoint)"
            ) from None
    outputs = model.output_shape[-1]
    if outputs != len(config.labels):
        raise ModelError(
            f"{path} outputs {outputs} scores but {run_dir / CONFIG_FILE} lists "
            f"{len(config.labels)} labels ({', '.join(config.labels)}): the model is another run's; put "
            "back this run's model.keras, or use the run it came from"
        )
    return model, model_digest(content)


class KerasClassifier:
    """A trained run folder as a classifier: features -> class probabilities."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.config = trained_run(self.run_dir)
        self.model, _ = load_trained(self.run_dir, self.config)
        self.labels = self.config.labels

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """(n, NUM_FRAMES, NUM_MFCC) features -> (n, labels) probabilities."""
        return self.model.predict(batch, batch_size=1000, verbose=0)
