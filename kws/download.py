"""Fetching Speech Commands: resumable download, SHA-256 check, safe unpacking."""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from kws import KwsError

DATASET_URL = "https://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
DATASET_SHA256 = "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"
DEFAULT_DATA_DIR = Path(os.environ.get("KWS_DATA_DIR", "data"))
COMPLETE_MARKER = ".kws-complete"
_CHUNK = 1 << 20
# tarfile's own guard where this Python has it (3.10.12+, 3.11.4+); _check_member runs anyway.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class DownloadError(KwsError, RuntimeError):
    """A download or unpacking that failed; the message says what to do."""


def _sha256(path: Path) -> str:
    """The file's SHA-256, with a bar: the 2.3 GB archive takes a while."""
    digest = hashlib.sha256()
    with (
        open(path, "rb") as file,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"checking {path.name.removesuffix('.part')}",
        ) as bar,
    ):
        for block in iter(lambda: file.read(_CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _check_sha256(path: Path, sha256: str | None, found: str, url: str) -> None:
    """DownloadError unless ``path`` (which ``found`` says how it came from ``url``) has the
    SHA-256 expected. The file stays: a mirror may pack the data set its own way, and its 2.3 GB
    are not fetched twice for that. From the official address, it is damaged."""
    if not sha256:
        return
    actual = _sha256(path)
    if actual == sha256.lower():
        return
    again = f"delete {path} and run again to download it afresh"
    if url == DATASET_URL and sha256.lower() != DATASET_SHA256:
        again = f"the official archive's is {DATASET_SHA256}: leave --sha256 out"
    elif url != DATASET_URL:
        again = (
            f"if {url} is a mirror that packs the data set its own way, run kws download again with "
            f"--sha256 {actual} to unpack it; else {again}"
        )
    raise DownloadError(f"{found} {path}, whose SHA-256 is {actual}, not the {sha256} expected: {again}")


def _transfer(url: str, part: Path, timeout: float, checked: bool) -> bool:
    """Append the rest of ``url`` to ``part``; True when the server had nothing left to send.
    ``checked``: a checksum will be checked, so that a ``part`` as long as the file is taken for it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing after our last byte: the file is whole
            return True
        raise
    with response:
        remaining = int(response.headers.get("Content-Length", 0)) or None
        if have and response.status != 206:
            if checked and remaining == have:  # the whole file, which a server ignoring Range sends
                return True
            tqdm.write(
                f"{url} does not resume downloads: starting again from its first byte", file=sys.stderr
            )
            have = 0
        total = have + remaining if remaining else None
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part")
            ) as bar,
        ):
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                bar.update(len(block))
        if remaining is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    return True


def fetch(url: str, destination: Path, sha256: str | None, attempts: int = 8, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination``, resuming after broken connections, and verify it.

    Bytes arrive in ``destination.part``, which survives a killed process: the next call
    continues where it stopped.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"--url {url!r} is not an http:// or https:// address")
    destination = Path(destination)
    if destination.exists():  # fetched before, by kws or by hand
        _check_sha256(destination, sha256, "the archive is", url)
        return destination
    made = _made_folder(destination.parent)
    try:
        return _fetch_into(url, destination, sha256, attempts, timeout)
    except BaseException:
        # A first run that failed before any byte arrived leaves no empty data folder behind.
        if made is not None:
            _remove_empty(destination.parent, up_to=made)
        raise


def _made_folder(folder: Path) -> Path | None:
    """Make ``folder``; return the topmost folder made here (None if it existed)."""
    topmost = next((f for f in reversed([folder, *folder.parents]) if not f.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, or no permission
        raise DownloadError(
            f"cannot make the folder {folder} ({error.strerror}): pick another --dir"
        ) from None
    return topmost


def _remove_empty(folder: Path, up_to: Path) -> None:
    """Remove ``folder`` and its parents up to ``up_to`` while they are empty."""
    for each in [folder, *folder.parents]:
        if any(each.iterdir()):
            return
        each.rmdir()
        if each == up_to:
            return


def _fetch_into(url: str, destination: Path, sha256: str | None, attempts: int, timeout: float) -> Path:
    part = destination.with_name(destination.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, timeout, checked=bool(sha256))
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            if isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500:
                raise DownloadError(f"{url}: the server answered {error.code} {error.reason}") from None
            have = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                again = f"resume from the {have:,} bytes in {part}" if have else "try again"
                raise DownloadError(
                    f"{url}: download failed {attempts} times ({error}); run the command again to {again}"
                ) from None
            what = (
                f"connection lost ({error}); resuming" if have else f"cannot connect ({error}); trying again"
            )
            tqdm.write(f"{what} in {attempt} s", file=sys.stderr)
            time.sleep(attempt)
    _check_sha256(part, sha256, "the download is", url)
    os.replace(part, destination)
    return destination


def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    """Refuse members that would land outside ``target`` or are not plain files or folders.

    Links are refused whatever they point at: Speech Commands holds none, and a chain of
    links that each stay inside can still lead a later member outside.
    """
    where = (target / member.name).resolve()
    if not where.is_relative_to(target):
        raise DownloadError(f"archive member {member.name!r} would land outside {target}; refusing to unpack")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(
            f"archive member {member.name!r} is a link, device or pipe, not a file; refusing to unpack"
        )


def _check_target(target: Path) -> None:
    """DownloadError if ``target`` exists but kws did not unpack it (it has no COMPLETE_MARKER):
    a data set unpacked by hand, perhaps with clips added, which unpacking would replace."""
    if target.exists() and not (target / COMPLETE_MARKER).exists():
        raise DownloadError(
            f"{target} exists but was not unpacked by kws download: pass it to kws with --data "
            f"{target}, or move it away to download the data set again"
        )


def unpack(archive: Path, target: Path) -> Path:
    """Unpack a .tar(.gz) into ``target``; the folder appears only once everything is out and
    the archive read to its end (a gzip archive's CRC, which checks it where no SHA-256 did)."""
    target = Path(target).resolve()
    if (target / COMPLETE_MARKER).exists():
        return target
    _check_target(target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    archive = Path(archive)
    try:
        # One pass, the bar following the compressed bytes read: listing the members first
        # would decompress the 2.3 GB twice, the first time with nothing to show. A member
        # refused midway leaves only the staging folder, which goes.
        with (
            open(archive, "rb") as raw,
            tarfile.open(fileobj=raw) as tar,
            tqdm(
                total=archive.stat().st_size, unit="B", unit_scale=True, desc=f"unpacking {archive.name}"
            ) as bar,
        ):
            for member in tar:
                _check_member(member, staging)
                tar.extract(member, staging, **_DATA_FILTER)
                bar.update(raw.tell() - bar.n)
            # tarfile stops quietly at a damaged header after the first: the rest of the stream
            # is read so that gzip checks its length and CRC, which a damaged archive fails.
            while tar.fileobj.read(_CHUNK):
                pass
            bar.update(raw.tell() - bar.n)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(
            f"{archive} is damaged or not a tar archive ({error}); delete it and download again"
        ) from None
    except DownloadError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as error:  # a full disk, most likely: the 2.3 GB unpack to about 3.8 GB
        shutil.rmtree(staging, ignore_errors=True)
        fix = (
            "free some space there, or pick another --dir"
            if error.errno == errno.ENOSPC
            else "pick another --dir"
        )
        raise DownloadError(
            f"cannot unpack {archive} into {target.parent} ({error.strerror or error}): {fix}"
        ) from None
    (staging / COMPLETE_MARKER).touch()
    os.replace(staging, target)
    return target


def download_dataset(
    data_dir: Path = DEFAULT_DATA_DIR, url: str = DATASET_URL, sha256: str | None = DATASET_SHA256
) -> Path:
    """Fetch and unpack Speech Commands into ``data_dir``; return the dataset folder."""
    # The name from the path alone: a signed mirror's address ends in ?token=...
    name = urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or "download"
    folder = next((name[: -len(s)] for s in (".tar.gz", ".tgz", ".tar") if name.endswith(s)), name + ".d")
    target = Path(data_dir) / folder
    if (target / COMPLETE_MARKER).exists():
        return target.resolve()  # as unpack's
    _check_target(target)  # before gigabytes are fetched for nothing
    archive = fetch(url, Path(data_dir) / name, sha256)
    return unpack(archive, target)
