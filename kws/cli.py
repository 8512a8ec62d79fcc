"""The `kws` command line; each command imports only what it needs (TensorFlow only to train/export)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

from kws import KwsError, Stopped, __version__, options, stopped_by_signals

SPLIT_NAMES = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "validation": "validation",
    "test": "testing",
    "testing": "testing",
}


class UserError(KwsError):
    """A command-line value that cannot work."""


def _words(text: str) -> list[str]:
    from kws.data import DataError, check_words, word_form

    words = list(dict.fromkeys(word_form(w.strip()) for w in text.split(",") if w.strip()))  # each once
    if not words:
        raise argparse.ArgumentTypeError("give at least one word, e.g. yes,no")

    try:
        check_words(words)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return words


def _require_train_extra(purpose: str, *modules: str) -> None:
    """UserError unless the ``modules`` of the [train] extra are installed: checked before the work
    that needs them starts, as the base install (`pip install kws`) has neither TensorFlow nor matplotlib."""
    import importlib.util

    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(
            f'{purpose} needs {" and ".join(missing)}, not installed here: pip install "kws[train]"'
        )


def _check_plot(path: Path) -> None:
    """UserError unless ``path`` names a .png file that can be written; checked before the scoring."""
    from kws.files import check_writable_folder

    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: name a .png file, as the plot is a PNG image")
    if path.is_dir():
        raise UserError(f"--plot {path} is a folder: name a .png file in it")
    check_writable_folder(path.parent, "--plot", path)
    _require_train_extra("--plot", "matplotlib")


def _given(**options) -> dict:
    """The options given on the command line: the others keep their config's default."""
    return {name: value for name, value in options.items() if value is not None}


def cmd_train(args) -> int:
    from kws.evaluate import percent
    from kws.stream import SILENCE, UNKNOWN
    from kws.train import train

    config, run_dir = _resumed_run(args) if args.resume else _new_run(args)
    _require_train_extra("training", "keras", "matplotlib")
    metrics = train(config, run_dir, resume=bool(args.resume))
    validation = metrics["validation"]
    # With their counts: on a few own clips, a recall can rest on one example.
    rows = {label: validation["per_class"][label] for label in (UNKNOWN, SILENCE)}
    recall = {label: f"{percent(row['recall'], 2)} of {row['support']:,}" for label, row in rows.items()}
    print(
        f"run {run_dir}: best epoch {metrics['best_epoch']}, "
        f"validation accuracy {validation['accuracy']:.2%} of {validation['examples']:,} examples "
        f"(_unknown_ recall {recall['_unknown_']}, _silence_ recall {recall['_silence_']}); "
        f"{metrics['parameters']:,} parameters, {metrics['macs']:,} MACs, "
        f"{metrics['training_seconds'] / 60:.1f} min"
    )
    return 0


def _resumed_run(args):
    """The config and folder of the run --resume continues; refused where an option would change
    it or its folders moved (train() checks the rest)."""
    from kws.runtime import CONFIG_FILE
    from kws.train import RunConfig

    given = {
        "--out": args.out,
        "--data": args.data,
        "--words": args.words,
        "--negatives": args.negatives,
        "--extra": args.extra,
        "--size": args.size,
        "--silence-share": args.silence_share,
        "--unknown-share": args.unknown_share,
        "--spec-augment": args.spec_augment or None,
        "--seed": args.seed,
        "--teacher": args.teacher,
    }
    changes = [flag for flag, value in given.items() if value not in (None, [])]
    if changes:
        raise UserError(
            f"{', '.join(changes)} cannot change a run being resumed: it goes on with the settings in "
            f"its config.json (only --epochs may be given); start a new run with --out to change them"
        )
    run_dir = Path(args.resume)
    config = RunConfig.load(run_dir)
    folders = [config.data.data_dir, *config.data.negatives, *config.data.extra]
    moved = next((folder for folder in folders if not Path(folder).is_dir()), None)
    if moved:  # train()'s check would advise --data, which a resumed run does not take
        raise UserError(
            f"{moved} is not there: the run reads its folders from {run_dir / CONFIG_FILE}; "
            'if they moved, set their new paths under "data" there (data_dir, negatives, extra)'
        )
    if args.epochs:
        config.train.epochs = args.epochs
    return config, run_dir


def _new_run(args):
    """The config of a new run from the options, and its folder; the data downloaded if not given."""
    from dataclasses import replace

    from kws.data import DataConfig, check_added_folders
    from kws.files import check_out_folder
    from kws.model import ModelConfig
    from kws.runtime import CONFIG_FILE
    from kws.train import RunConfig, TrainConfig

    if not args.out:
        raise UserError("say where the run goes: --out RUN (or continue one with --resume RUN)")
    run_dir = Path(args.out)
    if (run_dir / CONFIG_FILE).exists():
        raise UserError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir} or pick another --out"
        )
    check_out_folder(run_dir, "a run")
    # Absolute paths, so that `kws export` and `kws eval` find the data from any folder.
    data = DataConfig(
        data_dir=str(args.data.resolve()) if args.data else "",
        negatives=[str(p.resolve()) for p in args.negatives],
        extra=[str(p.resolve()) for p in args.extra],
        **_given(words=args.words, silence_share=args.silence_share, unknown_share=args.unknown_share),
    )
    # Before a download of 2.3 GB, and before train() loads TensorFlow: a mistyped word or
    # folder should not take an hour, or seconds, to report.
    check_added_folders(data)
    if args.data is None:
        from kws.download import DEFAULT_DATA_DIR, download_dataset

        print(f"no --data given: downloading Speech Commands into {DEFAULT_DATA_DIR}/", file=sys.stderr)
        data = replace(data, data_dir=str(download_dataset(DEFAULT_DATA_DIR).resolve()))
    config = RunConfig(
        data=data,
        model=ModelConfig.preset(args.size or "s"),
        train=TrainConfig(
            teachers=tuple(str(run.resolve()) for run in args.teacher),
            **_given(epochs=args.epochs, seed=args.seed),
        ),
    )
    config.augment.spec_augment = args.spec_augment
    return config, run_dir


def _load_classifier(path: Path):
    """A classifier with ``labels`` and ``scores(features)``, and what it was trained on (the
    manifest's ``training``: ``data`` settings, ``negatives`` speakers).

    A run folder is scored with its Keras model (TensorFlow); an export folder or .tflite with LiteRT.
    """
    from kws.runtime import CONFIG_FILE

    if path is not None and path.is_dir() and (path / CONFIG_FILE).exists():
        from kws.train import KerasClassifier

        _require_train_extra(f"scoring the run folder {path} (its Keras model)", "keras")
        classifier = KerasClassifier(path)
        return classifier, classifier.config.data_record()
    from kws.runtime import Model

    model = Model.load(path, named="--model")
    return model, _training(model.manifest, model.source)


def _training(manifest: dict, source: str) -> dict:
    """A model's manifest's record of its training data, which eval and calibrate split again."""
    from dataclasses import fields

    from kws.data import DataConfig

    training = manifest.get("training")
    data = training.get("data") if isinstance(training, dict) else None
    if not isinstance(data, dict) or not set(data) <= {field.name for field in fields(DataConfig)}:
        raise UserError(
            f"{source}: its manifest has no usable training record (training.data), which says how "
            "to split the data so that only clips the model never trained on are scored: use the "
            "manifest kws export wrote beside the model"
        )
    return training


def _evaluation_data(training: dict, data_dir: Path | None, negatives: list[Path] | None, scored: str):
    """The SpeechData a model was trained with (its manifest's or run's ``training`` record),
    from ``data_dir`` and ``negatives`` unless they are None, to score its ``scored`` split. Its
    ``--extra`` folders are left out: their clips only ever train, and they need not exist where
    the model is evaluated."""
    from kws.data import DataConfig, SpeechData

    overrides = {"extra": []}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if negatives is not None:
        overrides["negatives"] = [str(p) for p in negatives]
    data = SpeechData(DataConfig(**{**training["data"], **overrides}))
    if negatives is not None and data.negatives:
        # Held-out speakers are chosen among the folders given: other folders than training's
        # can hold out a speaker the model trained on, whose speech is then no test of it.
        trained = training.get("negatives", {}).get("training", {}).get("speakers", [])
        seen = sorted(set(data.negatives.speakers["held_out"]) & set(trained))
        if seen:
            print(
                f"warning: speakers {', '.join(seen)} of --negatives are held out here but the model "
                "trained on them (or on speakers of the same name), so the real speech and the test "
                "stream that holds it, and thresholds calibrated on them, are no held-out test: pass "
                "the folders it trained with, or speakers it never heard",
                file=sys.stderr,
            )
    _warn_if_split_again(training, data, scored)
    return data


def _warn_if_split_again(training: dict, data, scored: str) -> None:
    """Warn when ``data`` holds at least the clips of each keyword the model trained with, but fewer
    of them in training and more in the ``scored`` split (split lists added or edited, or
    speakers split otherwise by another kws): clips it trained on are then scored, and its
    figures read high. Counts cannot see clips that swapped places or new clips in training that
    make up for those moved out. (A model trained with --extra clips, which eval leaves out, is
    never warned of.)"""
    from kws.data import SPLITS

    recorded = training.get("clips_per_split", {})
    if not set(SPLITS) <= set(recorded):
        return
    now = Counter((clip.split, clip.word) for clip in data.clips)
    # The record counts the clips training could read; the folders may hold unreadable ones too.
    moved = {
        word: recorded["training"].get(word, 0) - now["training", word]
        for word in data.config.words
        if sum(now[split, word] for split in SPLITS) >= sum(recorded[split].get(word, 0) for split in SPLITS)
        and now[scored, word] > recorded[scored].get(word, 0)
    }
    moved = {word: count for word, count in moved.items() if count > 0}
    if moved:
        fewer = ", ".join(f"{word} -{count}" for word, count in moved.items())
        print(
            f"warning: {data.root} holds the clips of each keyword the model trained with, but fewer "
            f"of them in training than when it trained ({fewer}) and more in {scored}: clips it "
            "trained on are scored, so its figures read high; give the data the split lists it "
            "trained with",
            file=sys.stderr,
        )


def _model_name(path: Path | None) -> str:
    """What was scored, for the JSON report: the --model path given, else the built-in model's name."""
    from kws.runtime import resolve

    return str(path) if path is not None else resolve(None)[1]["name"]


def cmd_eval(args) -> int:
    from kws import features
    from kws.data import SPLIT_LISTS
    from kws.evaluate import format_report, report
    from kws.stream import UNKNOWN, keywords

    if args.stream:
        if args.split is not None:
            raise UserError(
                "--split is for clip accuracy: the test stream is always built from validation clips"
            )
        return _eval_stream(args)
    split = SPLIT_NAMES[args.split or "test"]
    if args.threshold is not None:
        raise UserError("--threshold is for --stream: clip accuracy takes each clip's best class")
    if args.plot:
        _check_plot(args.plot)
    classifier, training = _load_classifier(args.model)
    data = _evaluation_data(training, args.data, args.negatives, split)
    examples = data.evaluation_set(split)
    if not len(examples.labels):
        raise UserError(
            f"the {split} split of {args.data} holds none of the model's keywords "
            f"({', '.join(keywords(classifier.labels))}): there is nothing to score; pass data with "
            "their clips"
        )
    predictions = classifier.scores(features.mfcc(examples.audio)).argmax(axis=1)
    lists = [name for name in SPLIT_LISTS.values() if (data.root / name).exists()]
    if not data.package and not lists:  # own recordings, which a user may expect scored whole
        keyword_clips = [clip for clip in data.clips if clip.word in data.config.words]
        scored = sum(clip.split == split for clip in keyword_clips)
        print(
            f"note: {args.data} has no validation_list.txt or testing_list.txt, so the speaker hash of "
            f"its file names chose the {split} split: {scored} of its {len(keyword_clips)} keyword clips "
            "are scored; to score every clip, add an empty _unknown_ folder to it (the official test "
            "set's layout), and remove it before training on it",
            file=sys.stderr,
        )
    # A test set package's word folders are its keywords: the official one's on and off are not
    # the built-in model's.
    unspotted = data.package and sorted(
        {clip.word for clip in data.clips if not clip.word.startswith("_")} - set(data.config.words)
    )
    if unspotted:
        print(
            f"note: {args.data} has clips of {', '.join(unspotted)}, which this model does not spot: "
            f"they are scored as {UNKNOWN}, and listed with the other words below",
            file=sys.stderr,
        )
    missing = data.words_without_clips(split)
    if missing:
        other_split = split != "validation" and not data.package and lists  # somewhere else to look
        print(
            f"warning: the {split} split of {args.data} holds no clips of {', '.join(missing)}: "
            "its accuracy says nothing about them"
            + (" (--split validation scores the validation list)" if other_split else ""),
            file=sys.stderr,
        )
    result = {
        "model": _model_name(args.model),
        "data": str(args.data),
        "split": split,
        **report(classifier.labels, examples.labels, predictions, examples.sources, examples.words),
    }
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if args.plot:  # after the report: a plot that fails to write loses nothing measured
        from kws import plots
        from kws.files import write_files

        name = args.model.name if args.model else "built-in model"
        title = f"{name} on {args.data.name} ({result['split']})"
        write_files(args.plot.parent, {args.plot.name: plots.confusion(result, title)})
    return 0


def _eval_stream(args) -> int:
    from kws.runtime import Model
    from kws.stream_eval import format_stream_report, stream_test

    if args.plot:
        _check_plot(args.plot)
    model = Model.load(args.model, named="--model")
    # The stream's keywords are validation clips.
    data = _evaluation_data(_training(model.manifest, model.source), args.data, args.negatives, "validation")
    _, measured = stream_test(model, data, _detection_config(model, args.threshold), det=bool(args.plot))
    result = {
        "model": _model_name(args.model),
        "data": str(args.data),
        "split": "validation",
        **{k: v for k, v in measured.items() if k != "det"},
    }
    print(json.dumps(result, indent=2) if args.json else format_stream_report(result))
    if args.plot and result["recall"] is None:
        print(
            f"no {args.plot}: a DET curve needs keywords in the test stream, and it holds none",
            file=sys.stderr,
        )
    elif args.plot:  # after the report: a plot that fails to write loses nothing measured
        from kws import plots
        from kws.files import write_files

        if isinstance(args.threshold, dict):
            given = ", ".join(f"{keyword} {value:g}" for keyword, value in args.threshold.items())
            thresholds = f"thresholds {given}, the model's for the others"
        else:
            thresholds = (
                "the model's thresholds" if args.threshold is None else f"threshold {args.threshold:g}"
            )
        write_files(args.plot.parent, {args.plot.name: plots.det_curve(measured["det"], result, thresholds)})
    return 0


def cmd_calibrate(args) -> int:
    from dataclasses import replace

    from kws.export import recalibrate
    from kws.files import check_writable_folder
    from kws.runtime import BUILT_IN_MODEL, Model, resolve
    from kws.stream import HOP_MS, detection_config, duration
    from kws.stream_eval import false_accept_budget, format_stream_report

    _require_train_extra("calibrate (it redraws the export's DET curve)", "matplotlib")
    model, manifest = resolve(args.model, named="MODEL")
    advice = "calibrate rewrites the export's files: run it on a copy you can write"
    if model.parent.resolve() == BUILT_IN_MODEL.resolve():  # an upgrade of kws would undo it
        raise UserError(f"MODEL {args.model} is the built-in model: {advice} (cp -r {BUILT_IN_MODEL} COPY)")
    check_writable_folder(model.parent, "MODEL", args.model, advice)
    Model(model, manifest)  # the checks every command's model gets: a bad manifest is told, not a traceback
    config = detection_config(manifest)
    if args.hop_ms is not None:
        config = replace(config, hop_frames=round(args.hop_ms / HOP_MS))
    if args.average_ms is not None:
        config = replace(config, average_ms=args.average_ms)
    # Calibration's stream holds validation clips.
    data = _evaluation_data(_training(manifest, str(model)), args.data, args.negatives or None, "validation")
    updated = recalibrate(model, data, config, args.target_fa)  # resolved: its warnings came once
    print(format_stream_report(updated["streaming"]))
    if updated["detection"]["thresholds"] == config.thresholds:  # else it would look as if nothing ran
        hours = updated["streaming"]["stream_hours"]
        allowed = false_accept_budget(args.target_fa, hours)
        print(
            f"The thresholds are unchanged: {args.target_fa:g} per hour allows {allowed} false "
            f"accept{'s' * (allowed != 1)} on this {duration(hours)} test stream, and the thresholds the "
            "model had already find the most keywords within that."
        )
    return 0


LONG_RECORDING_SECONDS = 600.0  # kws detect shows a progress bar from this length on
STDIN = "-"  # detect's FILE and listen's --file for standard input (./- is a file named -)


def _file_or_stdin(text: str) -> Path | str:
    return STDIN if text == STDIN else Path(text)


DEFAULT_PORT = 8000  # of kws serve, and of the Docker image's health check


def cmd_detect(args) -> int:
    from kws import audio
    from kws.runtime import Model
    from kws.stream import SCORED_CLIP_SECONDS, Detector, Event, keywords

    if STDIN in args.files and (sys.stdin is None or sys.stdin.isatty()):  # it would wait for typing
        raise UserError("- reads a recording piped in, as in: ffmpeg -i talk.m4a -f wav - | kws detect -")
    model = Model.load(args.model, named="--model")
    detector = Detector(model, _detection_config(model, args.threshold))
    paths, failed = _recordings(args.files)
    reports = []
    for path in paths:
        try:
            report = _recording_report(detector, path, args.top_k)
        except audio.AudioError as error:
            print(f"kws detect: skipping {error}", file=sys.stderr)
            failed += 1
            continue
        if "damaged" in report:  # in the JSON too: a list does not say which file failed
            print(
                f"kws detect: warning: {report['damaged']}; the detections are those of its first "
                f"{report['duration']:.2f} s",
                file=sys.stderr,
            )
            failed += 1
        reports.append(report)
        if not args.json:
            found = report["detections"]
            print(f"{path}: {report['duration']:.2f} s, {len(found)} detection{'s' * (len(found) != 1)}")
            for event in found:
                print(f"  {Event(**event)}")
            if args.top_k and "scores" in report:
                print(
                    "  scores: "
                    + ", ".join(f"{label} {score:.4f}" for label, score in report["scores"].items())
                )
            elif args.top_k:
                print(f"  scores: none, as the recording is over {SCORED_CLIP_SECONDS:g} s long")
    one_file = len(args.files) == 1 and (args.files[0] == STDIN or not args.files[0].is_dir())
    if not args.json and len(reports) > 1:
        print(_detections_per_hour(reports, keywords(model.labels)))
    if args.json and one_file and reports:
        print(json.dumps(reports[0], indent=2))
    elif args.json and not one_file:
        print(json.dumps(reports, indent=2))
    # A single file that could not be read at all prints no JSON: its error and exit status say it all.
    return 1 if failed else 0


def _recording_report(detector, path: Path | str, top_k: int | None) -> dict:
    """``recording_report`` of a file, with a bar for recordings that take a while (~0.1 s a
    minute) on a terminal, or of the file's bytes on standard input (STDIN), read whole."""
    from tqdm import tqdm

    from kws import audio
    from kws.stream import recording_report

    if path == STDIN:
        return recording_report(detector, audio.decoded_blocks(sys.stdin.buffer.read(), "-"), "-", top_k)
    name, path = str(path), path.absolute()  # soundfile would read a relative "-" as standard input
    duration = audio.duration(path)
    with tqdm(
        total=round(duration, 2),
        unit="s",
        desc=path.name,
        leave=False,
        disable=True if duration < LONG_RECORDING_SECONDS else None,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of audio",
    ) as bar:
        return recording_report(detector, audio.blocks(path), name, top_k, bar)


def _detections_per_hour(reports: list[dict], labels: list[str]) -> str:
    """The total line of several recordings: their length and detections, per hour too from a
    minute of audio on, which on audio that holds no keyword is the false-accept rate a
    deployment will see."""
    from kws.stream import detections_text, duration

    seconds = sum(report["duration"] for report in reports)
    found = Counter(event["label"] for report in reports for event in report["detections"])
    rate = f", {sum(found.values()) * 3600 / seconds:.1f} per hour" if seconds >= 60 else ""
    counts = {label: found[label] for label in labels}
    return f"{len(reports)} recordings, {duration(seconds / 3600)}: {detections_text(counts)}{rate}"


def _recordings(paths: list[Path | str]) -> tuple[list[Path | str], int]:
    """Each FILE, and every audio file under each folder (sorted), each file once however many
    ways it was named; and how many folders held none."""
    from kws import audio
    from kws.evaluate import tally

    found, empty = [], 0
    for path in paths:
        if path == STDIN or not path.is_dir():
            found.append(path)
            continue
        others = []
        inside = audio.audio_files_under(path, others)
        foreign = Counter(
            p.suffix.lower() for p in others if p.suffix.lower() in audio.FOREIGN_AUDIO_SUFFIXES
        )
        if foreign:
            print(
                f"kws detect: warning: left out {path}'s recordings in formats kws cannot read "
                f"({tally(foreign)}): {audio.CONVERT}",
                file=sys.stderr,
            )
        if not inside:
            print(
                f"kws detect: skipping {path}: a folder with no audio files ({audio.AUDIO_SUFFIX_TEXT})",
                file=sys.stderr,
            )
            empty += 1
        found += inside
    once = {}
    for path in found:
        once.setdefault(path if path == STDIN else path.resolve(), path)
    return list(once.values()), empty


def cmd_listen(args) -> int:
    from kws import listen

    if args.list_devices:
        print(listen.device_table())
        return 0
    if args.fast and not args.file:
        raise UserError("--fast plays a --file faster than real time: give --file AUDIO")
    if args.fast and args.file == STDIN:
        raise UserError("--fast is for a file: audio piped in comes as fast as its writer sends it")
    if args.file == STDIN and (sys.stdin is None or sys.stdin.isatty()):  # it would wait for typing
        raise UserError(
            "--file - reads audio piped in, as in: arecord -f S16_LE -r 16000 | kws listen --file -"
        )
    from kws.runtime import Model
    from kws.stream import Detector

    try:
        if args.file:
            source = listen.recording(None if args.file == STDIN else args.file, not args.fast)
        else:
            source = listen.microphone(args.device)
        model = Model.load(args.model, named="--model")
        detector = Detector(model, _detection_config(model, args.threshold))
    except KeyboardInterrupt as stop:  # a service stopped as it starts ends as one stopped listening
        how = f"by {stop.signal_name}" if isinstance(stop, Stopped) else "with Ctrl-C"
        print(f"kws listen: stopped {how} before listening began", file=sys.stderr)
        return 0
    print(
        f"kws listen: {source.name} at {source.samplerate:.0f} Hz, model {model.manifest.get('name')}",
        file=sys.stderr,
    )

    def listening() -> None:
        print("kws listen: listening; Ctrl-C to stop", file=sys.stderr, flush=True)

    try:
        summary = listen.run(source, detector, sys.stdout, args.seconds, args.json, on_audio=listening)
        reader_gone = summary.stopped_by == listen.READER_GONE
        if reader_gone:  # as `kws detect | head`: the reader is done
            _silence(sys.stdout)
        # With --json, standard output holds only the events, for the program reading them.
        print(summary, file=sys.stderr if args.json or reader_gone else sys.stdout)
    except OSError as error:
        if error.errno != errno.EIO:
            raise
        # The terminal was closed (the write may fail before its SIGHUP arrives): listening
        # ended as SIGHUP ends it, and there is nobody left to tell.
        _silence(sys.stdout, sys.stderr)
    return 0


def cmd_export(args) -> int:
    from kws.export import checked_run, export
    from kws.files import check_out_folder
    from kws.runtime import EXPORT_FOLDER, MANIFEST_FILE

    _require_train_extra("export", "tensorflow", "matplotlib")
    checked_run(args.run)  # first: RUN/export of a RUN that is no run would be blamed on the folder
    out = args.out or args.run / EXPORT_FOLDER
    check_out_folder(out, "an export", MANIFEST_FILE, "--out" if args.out else "the export folder")
    manifest = export(args.run, out, args.target_fa)
    accuracy, sizes = manifest["accuracy"], manifest["sizes"]
    arena = (
        f"{sizes['tflm_arena_bytes']:,} B" if sizes["tflm_arena_bytes"] else "unknown (install tflite-micro)"
    )
    drop = accuracy["int8_drop_points"]
    change = f"{abs(drop):.2f} points {'lost' if drop > 0 else 'gained'}" if round(drop, 2) else "none lost"
    print(
        f"exported {args.run} to {out}: int8 {sizes['int8_bytes']:,} B, TFLM arena {arena}; validation "
        f"accuracy float32 {accuracy['float32']:.2%}, int8 {accuracy['int8']:.2%} ({change})"
    )
    from kws.stream_eval import format_stream_report

    print(format_stream_report(manifest["streaming"]))
    return 0


def cmd_serve(args) -> int:
    from dataclasses import replace

    from kws.runtime import Model
    from kws.server import Settings, serve

    try:
        settings = Settings.from_env()
        # KWS_PORT too is a container's setting, which the Docker image's health check reads.
        port = args.port or options.from_env("KWS_PORT", options.port) or DEFAULT_PORT
    except ValueError as error:
        raise UserError(str(error)) from None
    flags = {
        "model": args.model and str(args.model),
        "max_bytes": args.max_bytes,
        "max_seconds": args.max_seconds,
        "workers": args.workers,
        "cors_origins": args.cors_origins
        and tuple(dict.fromkeys(o for arg in args.cors_origins for o in arg)),
    }
    settings = replace(settings, **{name: value for name, value in flags.items() if value is not None})
    # A bad model fails here, once, rather than in every worker; the server and its workers load
    # the .tflite resolved here, so that a run folder's warnings come once, not once per process.
    model = Model.load(settings.model, named="--model" if args.model else "KWS_MODEL")
    _check_can_listen(args.host, port)
    serve(replace(settings, model=model.source), args.host, port)
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """UserError naming the address if the server could not listen there (before the workers start)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses and binds
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"cannot listen on {host}:{port} ({reason}): pick another --host or --port") from None


def cmd_synth(args) -> int:
    from kws.files import check_out_folder
    from kws.synth import SynthConfig, synthesize

    check_out_folder(args.out, "synthesized speech")
    config = SynthConfig(
        per_keyword=args.per_keyword,
        per_other_word=args.per_other_word,
        seed=args.seed,
        sound_alikes=args.sound_alikes,
    )
    count = synthesize(args.words, args.out, config)
    print(f"{count} clips in {args.out}; train with them: kws train ... --extra {args.out}")
    return 0


def cmd_download(args) -> int:
    from kws.download import download_dataset

    folder = download_dataset(args.dir, args.url, args.sha256 or None)
    print(f"Speech Commands is ready in {folder}; train with: kws train --data {folder} --out runs/first")
    return 0


def _detection_config(model, threshold):
    """The model's detection settings with --threshold's; UserError for a keyword it lacks."""
    from kws.stream import detection_config

    try:
        return detection_config(model.manifest, threshold)
    except ValueError as error:
        raise UserError(f"--threshold: {error}") from None


THRESHOLD_HELP = (
    "one threshold for every keyword, in (0, 1], in place of the model's calibrated ones (for "
    "example 0.9), or some keywords' own, the others keeping theirs (stop=0.99,go=0.95): lower finds "
    "more keywords and fires wrongly more often"
)


def _add_detector_options(command: argparse.ArgumentParser) -> None:
    """--model and --threshold, as the commands that run the Detector (listen, detect) take them."""
    command.add_argument("--model", type=Path, help="export folder or .tflite (default: the built-in model)")
    command.add_argument(
        "--threshold",
        type=options.threshold,
        help=f"{THRESHOLD_HELP} (kws eval --stream measures both)",
    )


def _add_train(commands) -> None:
    from kws.download import DEFAULT_DATA_DIR

    train = commands.add_parser(
        "train",
        help="train a DS-CNN keyword model",
        description="Train a DS-CNN on a Speech Commands-style folder. The run folder gets the best model "
        "(model.keras), config.json, metrics.json, plots and per-epoch checkpoints.",
        epilog="example (the built-in model's recipe, ~40 min on 2 cores): kws train --data "
        "../shared/data/speech_commands --negatives ../shared/data/librispeech "
        "--words yes,no,up,down,left,right,stop,go --unknown-share 0.4 --epochs 100 --seed 2 --out runs/s8",
    )
    train.add_argument(
        "--data",
        type=Path,
        help="Speech Commands folder, or your own recordings laid out as it is: a folder per word "
        "(WORD/SPEAKER_nohash_N.wav, or WORD/SPEAKER/ANY.wav), noise in _background_noise_/, and "
        "optionally validation_list.txt naming clips as WORD/FILE (README: Train on your own words) "
        f"(default: download Speech Commands into {DEFAULT_DATA_DIR}/)",
    )
    train.add_argument("--out", type=Path, help="run folder to create")
    train.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue an interrupted run from its last checkpoint"
    )
    train.add_argument(
        "--words",
        type=_words,
        default=None,
        help="comma-separated keywords; every other word "
        "is _unknown_ (default: yes,no,up,down,left,right,on,off,stop,go)",
    )
    train.add_argument(
        "--negatives",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder of speech without keywords; random 1 s windows become _unknown_ (repeatable)",
    )
    train.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder of more clips in the same layout (one folder per word), used for training only, "
        "e.g. from `kws synth` (repeatable)",
    )
    train.add_argument("--epochs", type=options.positive_int, help="passes over the data (default 40)")
    train.add_argument("--size", choices=["s", "m", "l"], help="DS-CNN size (default s)")
    train.add_argument(
        "--silence-share", type=options.share, help="share of _silence_ examples (default 0.1)"
    )
    train.add_argument(
        "--unknown-share",
        type=options.share,
        help="share of _unknown_ examples (default 0.1, the reference recipe's); with --negatives, 0.4 "
        "(half of it real speech) cut false accepts on unseen speech threefold at no cost in accuracy",
    )
    train.add_argument(
        "--spec-augment", action="store_true", help="mask random time and MFCC bands while training"
    )
    train.add_argument("--seed", type=options.seed, help="random seed (default 0)")
    train.add_argument(
        "--teacher",
        type=Path,
        action="append",
        default=[],
        metavar="RUN",
        help="run folder of a trained model on the same words: the new model learns from the teachers' "
        "mean answers as much as from the labels (repeatable; knowledge distillation)",
    )
    train.set_defaults(handler=cmd_train)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score a model on a labelled folder",
        description="Accuracy, per-class precision and recall and the confusion matrix of a model on a "
        "Speech Commands folder (a split of it) or on the official test set package.",
        epilog="example: kws eval --model runs/s8 --data ../shared/data/speech_commands --split validation "
        "--negatives ../shared/data/librispeech",
    )
    evaluate.add_argument(
        "--model",
        type=Path,
        help="run folder (scored with its Keras model) or exported model: export folder or .tflite "
        "(default: the built-in model)",
    )
    evaluate.add_argument(
        "--data", type=Path, required=True, help="Speech Commands folder or test set package"
    )
    evaluate.add_argument(
        "--split",
        choices=sorted(SPLIT_NAMES),
        help="which split of a Speech Commands folder to score clips of (default test; a test package is "
        "all test); --stream always builds its stream from validation clips",
    )
    evaluate.add_argument(
        "--negatives",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="speech without keywords: its held-out speakers fill _unknown_ as in training "
        "(only what is given here, never the run's own)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    evaluate.add_argument(
        "--plot", type=Path, metavar="PNG", help="also draw the confusion matrix (DET curve with --stream)"
    )
    evaluate.add_argument(
        "--stream",
        action="store_true",
        help="run the streaming Detector over a long test stream built from held-out clips, noise and "
        "--negatives speech: recall per keyword and false accepts per hour (exported models only)",
    )
    evaluate.add_argument("--threshold", type=options.threshold, help=f"with --stream: {THRESHOLD_HELP}")
    evaluate.set_defaults(handler=cmd_eval)


def _add_export(commands) -> None:
    from kws.stream import FA_TARGET_PER_HOUR

    export = commands.add_parser(
        "export",
        help="turn a trained run into files for phones and microcontrollers",
        description="Write model_int8.tflite (full-integer), model_float16.tflite, model_float32.tflite, "
        "manifest.json, and the MCU bundle (model_data.cc/.h, kws_frontend.c/.h) for a trained run. "
        "Calibrates int8 ranges on the run's training data and reports float vs int8 validation accuracy.",
        epilog="example: kws export runs/s8   (writes runs/s8/export/)",
    )
    export.add_argument("run", type=Path, help="run folder made by `kws train`")
    export.add_argument("--out", type=Path, help="output folder (default RUN/export)")
    export.add_argument(
        "--target-fa",
        type=options.per_hour,
        default=FA_TARGET_PER_HOUR,
        metavar="PER_HOUR",
        help="false accepts per hour, all keywords together, that the thresholds are calibrated to "
        f"(default {FA_TARGET_PER_HOUR:g})",
    )
    export.set_defaults(handler=cmd_export)


def _add_calibrate(commands) -> None:
    from kws.stream import CLIP_MS, FA_TARGET_PER_HOUR, HOP_MS

    calibrate = commands.add_parser(
        "calibrate",
        help="re-choose an exported model's keyword thresholds",
        description="Score a long held-out test stream and held-out real speech, choose the per-keyword "
        "thresholds that find the most keywords while all their false accepts together meet a target, "
        "and store them (and the measured recall and false accepts per hour) in the model's manifest; "
        "listen, detect and serve use them. Redraws the export's DET curve, so it needs the [train] "
        "extra's matplotlib.",
        epilog="example: kws calibrate runs/s8/export --target-fa 0.25",
    )
    calibrate.add_argument("model", type=Path, help="export folder or .tflite")
    calibrate.add_argument("--data", type=Path, help="Speech Commands folder (default: the training data)")
    calibrate.add_argument(
        "--negatives",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="speech without keywords (default: the training negatives; their held-out speakers are used)",
    )
    calibrate.add_argument(
        "--target-fa",
        type=options.per_hour,
        default=FA_TARGET_PER_HOUR,
        metavar="PER_HOUR",
        help=f"false accepts per hour, all keywords together (default {FA_TARGET_PER_HOUR:g}; 0: none)",
    )
    calibrate.add_argument(
        "--hop-ms",
        type=options.hop_ms,
        help=f"run the model every N ms (a multiple of {HOP_MS:g}, up to the {CLIP_MS:g} ms window; "
        "default: the manifest's)",
    )
    calibrate.add_argument(
        "--average-ms",
        type=options.average_ms,
        help=f"score averaging window, up to {CLIP_MS:g} ms (default: the manifest's)",
    )
    calibrate.set_defaults(handler=cmd_calibrate)


def _add_listen(commands) -> None:
    listen = commands.add_parser(
        "listen",
        help="spot keywords live in a microphone's audio",
        description="Listen to a microphone at its own sample rate, resample to 16 kHz on the fly and print "
        "each detection as it happens (with a level meter on a terminal). --file plays an audio file "
        "through the same path instead, and --file - the audio another program pipes in. Ctrl-C stops "
        "listening, prints a summary (audio heard, detections per keyword) and exits with code 0.",
        epilog="examples: kws listen --list-devices;  kws listen --device 2;  "
        "kws listen --file a.wav --fast;  arecord -f S16_LE -r 16000 | kws listen --file -;  "
        "kws listen --json | while read -r event; do ...; done",
    )
    inputs = listen.add_mutually_exclusive_group()
    inputs.add_argument(
        "--device",
        help="input device: its index or (part of) its name in --list-devices (default: the system's)",
    )
    inputs.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    inputs.add_argument(
        "--file",
        type=_file_or_stdin,
        metavar="AUDIO",
        help="play an audio file through the microphone's code path; - reads WAV piped in as it arrives "
        "(arecord, ffmpeg -f wav -)",
    )
    listen.add_argument(
        "--fast", action="store_true", help="with --file: as fast as possible, not in real time"
    )
    listen.add_argument(
        "--seconds",
        type=options.seconds,
        help="stop after this much audio (default: at Ctrl-C or the end of --file)",
    )
    listen.add_argument(
        "--json",
        action="store_true",
        help="print each detection as one JSON line ({label, score, start, end}, as kws detect --json) "
        "for a program reading the output, and the summary on standard error",
    )
    _add_detector_options(listen)
    listen.set_defaults(handler=cmd_listen)


def _add_detect(commands) -> None:
    from kws.stream import SCORED_CLIP_SECONDS

    detect = commands.add_parser(
        "detect",
        help="find keywords in audio files",
        description="Run the streaming Detector over audio files (WAV, FLAC, OGG, MP3, AIFF, AU, W64, RF64, "
        "CAF; any sample rate from 8 to 768 kHz, any length), or every audio file in folders, and print each "
        "detection with its time.",
        epilog="examples: kws detect recording.wav --json;  kws detect recordings/",
    )
    detect.add_argument(
        "files",
        type=_file_or_stdin,
        nargs="+",
        metavar="FILE",
        help="audio files, or folders: every audio file in them; - reads one file's bytes from "
        "standard input (ffmpeg -i talk.m4a -f wav - | kws detect -), whole: for audio that keeps "
        "coming, kws listen --file -",
    )
    _add_detector_options(detect)
    detect.add_argument(
        "--top-k",
        type=options.positive_int,
        metavar="K",
        help=f"list the K highest class scores of recordings up to {SCORED_CLIP_SECONDS:g} s long (of "
        "their most confident window) in the text; the JSON lists all of them, or these K",
    )
    detect.add_argument(
        "--json", action="store_true", help="one JSON object per file (a list for several or a folder)"
    )
    detect.set_defaults(handler=cmd_detect)


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the Detector over HTTP and WebSocket",
        description="Run the HTTP API: POST /detect (a recording -> the JSON of kws detect --json), "
        "WS /stream (live 16-bit PCM -> detection events), /health, /ready, /model, /metrics, docs at /docs. "
        "Set KWS_API_KEY to require a key (X-API-Key or Authorization: Bearer) on all but /health. "
        "--port, --model, --workers, --max-bytes and --max-seconds can also come from KWS_PORT, KWS_MODEL, "
        "KWS_WORKERS, KWS_MAX_BYTES and KWS_MAX_SECONDS.",
        epilog="example: kws serve --model runs/s8/export --workers 2; "
        "curl --data-binary @clip.wav localhost:8000/detect",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=options.port, help=f"port (default: $KWS_PORT, else {DEFAULT_PORT})")
    serve.add_argument(
        "--model", type=Path, help="export folder or .tflite (default: $KWS_MODEL, else the built-in model)"
    )
    serve.add_argument(
        "--workers",
        type=options.positive_int,
        help="processes running POST /detect, each with the model, fed from one queue "
        "(default: one per CPU core, no more than a container's CPU quota)",
    )
    serve.add_argument(
        "--max-bytes",
        type=options.positive_int,
        help="largest request body, in bytes (default 10,000,000): else 413",
    )
    serve.add_argument(
        "--max-seconds",
        type=options.seconds,
        help="longest recording POST /detect takes, in seconds (default 60): else 413",
    )
    serve.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        type=options.origins,
        metavar="ORIGIN",
        help="a web page's origin (http://homeassistant.local:8123) allowed to call the API from a "
        "browser and open streams; repeatable, or comma-separated, * for any (default: $KWS_CORS_ORIGINS, "
        "else none: pages of other origins get 403 and cannot open streams; the server's own /docs "
        "may call the API where it is reached at an IP address or localhost, else allow its origin too)",
    )
    serve.set_defaults(handler=cmd_serve)


def _add_synth(commands) -> None:
    from kws.synth import SynthConfig

    synth = commands.add_parser(
        "synth",
        help="synthesize training clips of the keywords and of other words with espeak-ng",
        description="Write 1 s clips of each keyword and of ~270 other words, each in its own espeak-ng "
        "voice (8 English accents, ~100 voice variants, pitch and speed drawn at random), in the Speech "
        "Commands layout. Give the folder to `kws train --extra`: the clips train, never validate. The "
        "keywords are synthesized too, so that a synthetic voice is no cue for _unknown_. Needs espeak-ng "
        "(Debian/Ubuntu: apt-get install espeak-ng).",
        epilog="example: kws synth --words yes,no,up,down,left,right,stop,go --out data/synth",
    )
    synth.add_argument("--words", type=_words, required=True, help="comma-separated keywords, as for train")
    synth.add_argument("--out", type=Path, required=True, help="folder to create")
    synth.add_argument(
        "--per-keyword",
        type=options.positive_int,
        default=SynthConfig.per_keyword,
        help=f"clips of each keyword (default {SynthConfig.per_keyword})",
    )
    synth.add_argument(
        "--per-other-word",
        type=options.positive_int,
        default=SynthConfig.per_other_word,
        help=f"clips of each other word (default {SynthConfig.per_other_word})",
    )
    synth.add_argument(
        "--sound-alikes",
        type=_words,
        default=[],
        metavar="WORDS",
        help="comma-separated words that sound like your keywords (mouse,horse for house), which the "
        "model must learn are not them: each gets as many clips as a keyword (the ~270 other words "
        "hold those of yes no up down left right stop go)",
    )
    synth.add_argument(
        "--seed",
        type=options.seed,
        default=SynthConfig.seed,
        help=f"random seed of the voices (default {SynthConfig.seed})",
    )
    synth.set_defaults(handler=cmd_synth)


def _add_download(commands) -> None:
    from kws.download import DATASET_SHA256, DATASET_URL, DEFAULT_DATA_DIR

    download = commands.add_parser(
        "download",
        help="download and unpack Speech Commands v0.02",
        description="Fetch speech_commands_v0.02.tar.gz (2.3 GB) with a progress bar, resume a broken "
        "download, verify its SHA-256 and unpack it safely.",
    )
    download.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"where to put it (default {DEFAULT_DATA_DIR}/, or $KWS_DATA_DIR)",
    )
    download.add_argument("--url", default=DATASET_URL, help="archive address (default: the official one)")
    download.add_argument("--sha256", default=DATASET_SHA256, help="expected checksum ('' to skip the check)")
    download.set_defaults(handler=cmd_download)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kws",
        description="Keyword spotting. Find keywords in recordings (detect), a microphone (listen) or over "
        "HTTP (serve) with the built-in model for yes, no, up, down, left, right, stop, go; or train your "
        "own DS-CNN on Speech Commands, evaluate it and export it for phones and microcontrollers.",
        epilog="Start with: kws detect recording.wav.  Run `kws COMMAND --help` for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kws {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_eval(commands)
    _add_export(commands)
    _add_calibrate(commands)
    _add_listen(commands)
    _add_detect(commands)
    _add_serve(commands)
    _add_synth(commands)
    _add_download(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports numpy and scipy: Ctrl-C may come before any command runs
    except KeyboardInterrupt:
        print("\nkws: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    # A file name that is not UTF-8 prints escaped (as on stderr), not as a UnicodeEncodeError.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    # kws serve leaves signals to uvicorn, which stops gracefully on them.
    stopping = stopped_by_signals() if args.command != "serve" else contextlib.nullcontext()
    try:
        with stopping:
            return args.handler(args)
    except BrokenPipeError:  # `kws detect ... | head`: the reader has all it wanted
        _silence(sys.stdout)
        return 0
    # OSError: a path the user gave that cannot be read or written (missing, no permission, full disk).
    except (KwsError, OSError) as error:
        print(f"kws {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        with contextlib.suppress(OSError):  # a closed terminal's SIGHUP: nobody to tell
            print(
                f"\nkws {args.command}: stopped by {stop.signal_name}{_how_to_go_on(args)}", file=sys.stderr
            )
        return 128 + signal.Signals[stop.signal_name]
    except KeyboardInterrupt:
        print(f"\nkws {args.command}: interrupted{_how_to_go_on(args)}", file=sys.stderr)
        return 130


def _silence(*streams) -> None:
    """Point ``streams`` at /dev/null, so that exiting flushes nowhere: their reader is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in streams:
        os.dup2(devnull, stream.fileno())


def _how_to_go_on(args) -> str:
    """For an interrupted training run: the command that continues it."""
    from kws.runtime import CONFIG_FILE

    if args.command != "train":
        return ""
    run = args.resume or args.out
    if run is None or not (Path(run) / CONFIG_FILE).exists():
        return ""
    return f"; continue it with: kws train --resume {run}"


if __name__ == "__main__":
    sys.exit(main())
