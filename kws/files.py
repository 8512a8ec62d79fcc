"""Writing artifacts safely: to a temporary name beside the target, then an atomic rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from kws import STOP_SIGNALS, KwsError

TEMPORARY_PREFIX = ".tmp-"  # of the files written before they are renamed into place


def check_out_folder(folder: str | Path, what: str, earlier: str | None = None, named: str = "--out") -> None:
    """KwsError unless ``folder`` can take ``what`` ("a run"): absent, empty, or holding an
    earlier one (its file ``earlier``, when given), where this process can write. Checked
    before long work, which would otherwise fail only when it writes its results. Messages
    call the folder ``named``: the option given, or what a default folder is."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KwsError(f"{named} {folder} is a file: {what} is a folder; pick another --out")
    # A kws killed while writing leaves its temporary file: no one's work, to be overwritten.
    names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
    others = sorted(name for name in names if not name.startswith(TEMPORARY_PREFIX))
    if others and not (earlier and (folder / earlier).exists()):  # their files would be overwritten
        listed = ", ".join(others[:3]) + ", ..." * (len(others) > 3)
        raise KwsError(
            f"{named} {folder} holds other files ({listed}){f' and no {earlier}' if earlier else ''}: "
            f"{what} goes into a new or empty folder{', or over an earlier one' if earlier else ''}; "
            "pick another --out"
        )
    check_writable_folder(folder, named, folder, "pick another --out")


def check_writable_folder(folder: str | Path, option: str, value: str | Path, advice: str = "") -> None:
    """KwsError unless ``folder`` is, or can be made as, a folder this process can write in; the
    messages name the ``option`` and ``value`` given, and end with ``advice`` (by default, to
    pick another)."""
    folder = Path(folder)
    advice = advice or f"pick another {option}"
    broken = next(
        (path for path in [folder, *folder.parents] if path.is_symlink() and not path.exists()), None
    )
    if broken is not None:
        raise KwsError(
            f"{option} {value}: {broken} links to {os.readlink(broken)}, which does not exist; {advice}"
        )
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    if not existing.is_dir():
        raise KwsError(f"{option} {value}: {existing} is a file, so no folder can be made in it; {advice}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:  # no permission, a read-only disk, an immutable folder
        raise KwsError(f"{option} {value}: cannot write in {existing} ({error.strerror}); {advice}") from None


def _temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: beside it, hidden, named for
    this process, so that two processes writing the same target never rename each other's
    half-written file."""
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")


def _flush_to_disk(path: Path) -> None:
    """fsync ``path``, a file or a folder. Before a rename, it keeps a crash from leaving the new
    name on an empty file; after, the folder's keeps the rename itself."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _flush_folder(folder: Path) -> None:
    """fsync a folder after a rename into it, where that can be done. The rename has happened:
    a folder this process may write but not read, or a file system that refuses a folder's
    fsync (network, FUSE), does not make it fail."""
    with contextlib.suppress(OSError):
        _flush_to_disk(folder)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds.

    The temporary name ends with the target's name, so writers that check suffixes
    (``.keras``, ``.weights.h5``, ``.png``) accept it. A missing folder is made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, path)
        _flush_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def emptied_on_failure(folder: str | Path):
    """Make ``folder`` (absent or empty) and yield it; if the block fails or is interrupted, empty
    it again, so that no half-filled folder is left to pass for a whole one. Filled in place, not
    renamed into place: ``folder`` may be a link or a mount point, and keeps the usual permissions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        raise


def write_files(folder: str | Path, contents: dict[str, bytes | str]) -> None:
    """Write ``contents`` (file name -> bytes or text) into ``folder`` as one set.

    Every file is written under its temporary name before the first replaces its target, so a
    failure while writing (a full disk) leaves the folder's files as they were, not some new
    and some old; and a Ctrl-C, SIGTERM or SIGHUP on the main thread waits for the renames that
    follow. (A kill, or a failure among the renames, can still leave a mix.)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = {folder / name: _temporary(folder / name) for name in contents}
    try:
        for tmp, data in zip(temporary.values(), contents.values(), strict=True):
            if isinstance(data, str):
                tmp.write_text(data)
            else:
                tmp.write_bytes(data)
        for tmp in temporary.values():
            _flush_to_disk(tmp)
        with _stops_deferred():
            for path, tmp in temporary.items():
                os.replace(tmp, path)
        _flush_folder(folder)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


@contextmanager
def _stops_deferred():
    """Hold a Ctrl-C or one of STOP_SIGNALS that comes during the block until it ends, then
    deliver each that came to the handler that was there before. Signals ignored before (a
    background job's SIGINT, nohup's SIGHUP) stay ignored. Where this thread cannot set signal
    handlers (any but the main thread), the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    held = [s for s in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, lambda got, frame: arrived.append(got)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back; the default stands in.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    for signum in dict.fromkeys(arrived):  # each once, in the order they came
        signal.raise_signal(signum)


def json_text(data) -> str:
    return json.dumps(data, indent=2) + "\n"


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))
