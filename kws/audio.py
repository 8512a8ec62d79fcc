"""Audio in: decode files or bytes of the FORMATS below, mix to mono, resample to 16 kHz."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import select
import stat
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from kws import KwsError
from kws.features import CLIP_SAMPLES, SAMPLE_RATE

# What folders are searched for, as messages list it: libsndfile's formats under their usual
# names (.w64, .rf64 and .caf hold recordings over 4 GB).
AUDIO_SUFFIX_TEXT = ".wav .flac .ogg .oga .opus .mp3 .aiff .aif .aifc .au .snd .w64 .rf64 .caf"
AUDIO_SUFFIXES = tuple(AUDIO_SUFFIX_TEXT.split())
CONVERT = f"convert to a format kws reads ({AUDIO_SUFFIX_TEXT}), e.g. ffmpeg -i IN OUT.wav"
# The formats of those suffixes (and NIST Sphere, the .wav of speech corpora such as TIMIT), as
# soundfile names them. libsndfile reads others too (SDS, PAF, VOC, ...), little used and little
# tried: a damaged SDS upload had it print 2,000 lines to standard output, into kws detect's JSON.
FORMATS = ("WAV", "WAVEX", "NIST", "FLAC", "OGG", "MP3", "AIFF", "AU", "W64", "RF64", "CAF")
# Recordings libsndfile cannot read (phones' voice memos, browsers' and video containers): a
# folder's other files (notes, transcripts) are left out quietly, these with a word on what to do.
FOREIGN_AUDIO_SUFFIXES = (".m4a", ".aac", ".mp4", ".3gp", ".amr", ".webm", ".weba", ".wma", ".mka")
BLOCK_SECONDS = 10.0  # of a recording decoded at a time
# Samples (all channels) decoded at a time at most, whatever the rate and channels: 8 MB.
BLOCK_VALUES = 2**21
# Under a duration limit, at most this much audio per second of it (stereo at 192 kHz): a few
# hundred kB of compressed silence at FLAC's 655 kHz and 8 channels would decode to gigabytes.
MAX_VALUES_PER_SECOND = 2 * 192_000
UNKNOWN_LENGTH = 2**62  # libsndfile's frame count for a stream whose header gives no length
# The lowest sample rate taken: below it, a recording lacks part of the band the MFCCs cover
# (to 4 kHz) and upsampling it to 16 kHz would only invent samples.
MIN_SAMPLE_RATE = 8_000
# The highest rate audio interfaces record at. A header above it is damaged or crafted, and its
# length in seconds understates the work: resampling 2^31 Hz to 16 kHz costs ~150 times as much
# per sample, so 112 KB of such a file took a server's worker 2.5 s.
MAX_SAMPLE_RATE = 768_000
# A second axis longer than this holds frames, not channels: (channels, frames), as librosa
# gives multichannel audio, read as (frames, channels) would mix a recording into a few samples.
MAX_CHANNELS = 64
# Floats past this peak (12 dB over full scale) are integer PCM converted without scaling, the
# usual slip (np.frombuffer(data, np.int16).astype(np.float32)): clipped, they are noise.
MAX_FLOAT_PEAK = 4.0
STDIN_NAME = "standard input"  # how messages name audio piped in
PIPE_ADVICE = (
    "pipe in WAV, as arecord and ffmpeg -f wav - write it (raw samples do not say their rate), or give "
    "a file by its path"
)
# A WAV writer to a pipe cannot come back to fill in its data size: it writes 0 or a size this
# large or larger (ffmpeg 0xFFFFFFFF, arecord 0x80000000, sox 0x7FFFF000), and its audio ends
# when it stops writing.
PLACEHOLDER_SIZE = 0x7FFF0000
# WAV format tags and sample widths in bits -> libsndfile's subtypes for their raw samples
WAV_SUBTYPES = {
    (1, 8): "PCM_U8",
    (1, 16): "PCM_16",
    (1, 24): "PCM_24",
    (1, 32): "PCM_32",
    (3, 32): "FLOAT",
    (3, 64): "DOUBLE",
    (6, 8): "ALAW",
    (7, 8): "ULAW",
}
WAV_EXTENSIBLE = 0xFFFE  # its real format tag is the first two bytes of a GUID in the fmt chunk
MAX_WAV_HEADER = 1 << 20  # bytes before the samples: more is not a WAV header


class AudioError(KwsError, ValueError):
    """Audio that cannot be used; the message names the source and the reason."""


class TooLong(AudioError):
    """Audio over a duration limit, found from its header before a sample is decoded."""


def mono_samples(chunk) -> np.ndarray:
    """Audio as a program holds it -> mono float32 samples, clipped to full scale [-1, 1].

    Floats are taken at full scale 1, and refused (AudioError) past MAX_FLOAT_PEAK; signed
    integer PCM (int8, int16, int32, as sounddevice, PyAudio and WAV files give it) is scaled to
    that; (frames, channels) is mixed to mono. Other types (bytes, unsigned or 64-bit integers)
    are a TypeError, other shapes and NaN or infinite samples an AudioError, each saying what to
    pass. (channels, frames), as librosa gives it, is refused where it has more than MAX_CHANNELS
    frames; a shorter chunk reads as that many channels. Files are clipped as they are decoded
    (``blocks``), as a converter would: a float file past full scale is no program's slip.
    """
    array = np.asarray(chunk)
    # The usual chunk (a microphone's, a decoded file's), checked in two passes: NaN fails both.
    if (
        array.dtype == np.float32
        and array.ndim == 1
        and array.min(initial=0) >= -1
        and array.max(initial=0) <= 1
    ):
        return array
    if array.dtype.kind == "i" and array.dtype.itemsize <= 4:
        array = array.astype(np.float32) / np.float32(2 ** (8 * array.dtype.itemsize - 1))
    elif array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    else:
        raw = " (for raw 16-bit PCM bytes: np.frombuffer(data, '<i2'))" if isinstance(chunk, bytes) else ""
        raise TypeError(
            f"audio samples of type {array.dtype}: pass floats at full scale 1 or signed integer PCM "
            f"(int16, int32){raw}"
        )
    if array.ndim == 2 and array.shape[1] > MAX_CHANNELS:
        raise AudioError(
            f"audio samples of shape {array.shape}: (frames, channels) with {array.shape[1]} channels? "
            "For (channels, frames), as librosa gives it, pass its transpose (.T)"
        )
    if array.ndim == 2:
        array = array[:, 0] if array.shape[1] == 1 else array.mean(axis=1, dtype=np.float32)
    if array.ndim != 1:
        raise AudioError(f"audio samples of shape {array.shape}: pass (frames,) or (frames, channels)")
    if not np.isfinite(array).all():
        raise AudioError("audio samples hold NaN or infinite values")
    if (peak := float(np.abs(array).max(initial=0))) > MAX_FLOAT_PEAK:
        raise AudioError(
            f"audio samples reach {peak:g}, {20 * np.log10(peak):.0f} dB over the full scale of 1: integer "
            "PCM turned into floats without scaling? Pass the integers themselves (int16), or floats "
            "divided by 32768 (16-bit)"
        )
    return np.clip(array, -1.0, 1.0)


class ModelRate:
    """Blocks of audio at ``rate`` in, mono float32 at SAMPLE_RATE out, as they come.

    The microphone, WebSocket streams and files all convert through it; however the audio
    is cut into blocks, the samples out are the same as for the whole at once.
    """

    def __init__(self, rate: float):
        self._resampler = (
            None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        )

    def convert(self, block: np.ndarray) -> np.ndarray:
        """Samples as ``mono_samples`` takes them -> the (mono, 16 kHz) samples ready so far."""
        block = mono_samples(block)
        return block if self._resampler is None else self._resampler.resample_chunk(block)

    def finish(self) -> np.ndarray:
        """The samples the resampler still holds at the end of the audio."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)


@contextlib.contextmanager
def _decoding(name: str, advice: str | None = None):
    """Any failure of the decoder as an AudioError naming the source, the decoder's reason and
    ``advice``; without it, CONVERT for a format libsndfile does not know."""
    try:
        yield
    except AudioError:
        raise
    except Exception as error:  # soundfile raises several types for undecodable input
        reason = getattr(error, "error_string", None) or str(error)  # libsndfile's own words
        if "not a regular file" in reason:  # its words for an MP3 too short to find a frame in
            reason = "too short or damaged to find audio in"
        if advice is None and "not recognised" in reason:  # AAC (.m4a), WebM, AMR: never read
            advice = CONVERT
        raise AudioError(
            f"{name}: cannot decode audio ({reason})" + (f": {advice}" if advice else "")
        ) from None


def _check_header(file: sf.SoundFile, name: str, max_seconds: float | None) -> None:
    """AudioError for a header without a length, with no samples or with a rate under
    MIN_SAMPLE_RATE; TooLong for audio over ``max_seconds`` or, at its rate and channels, over
    MAX_VALUES_PER_SECOND for each of those seconds; AudioError for a format not in FORMATS
    or over MAX_CHANNELS channels, before a sample is decoded."""
    if file.format not in FORMATS:
        raise AudioError(f"{name}: {file.format_info} audio: {CONVERT}")
    _check_channels_and_rate(file, name)
    if file.frames >= UNKNOWN_LENGTH:
        raise AudioError(f"{name}: its header gives no length (written to a pipe?): encode it again")
    if not file.frames:
        raise AudioError(f"{name}: holds no audio samples")
    if max_seconds is None:
        return
    seconds = file.frames / file.samplerate
    if seconds > max_seconds:
        raise TooLong(f"{name}: {seconds:.1f} s of audio, over the {max_seconds:g} s limit")
    if file.frames * file.channels > max_seconds * MAX_VALUES_PER_SECOND:
        raise TooLong(
            f"{name}: {file.channels} channels at {file.samplerate} Hz for {seconds:.1f} s, more samples "
            f"than {max_seconds:g} s of stereo at 192 kHz"
        )


def _check_channels_and_rate(file: sf.SoundFile, name: str) -> None:
    """AudioError for over MAX_CHANNELS channels or a rate outside MIN_SAMPLE_RATE to MAX_SAMPLE_RATE."""
    if file.channels > MAX_CHANNELS:
        raise AudioError(
            f"{name}: {file.channels} channels, over the {MAX_CHANNELS} kws mixes: mix it down first"
        )
    if file.samplerate < MIN_SAMPLE_RATE:
        raise AudioError(
            f"{name}: recorded at {file.samplerate} Hz, under the {MIN_SAMPLE_RATE} Hz the model needs: "
            "record it again at 16 kHz"
        )
    if file.samplerate > MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name}: its header says {file.samplerate:,} Hz, over the {MAX_SAMPLE_RATE:,} Hz of any "
            "recorder: the header is damaged; convert the file again, e.g. ffmpeg -i IN -ar 16000 OUT.wav"
        )


def _decode_frames(file: sf.SoundFile, seconds: float = BLOCK_SECONDS) -> int:
    """Frames to decode at a time: ``seconds`` of the file, at most BLOCK_VALUES samples."""
    return max(1, min(round(seconds * file.samplerate), BLOCK_VALUES // file.channels))


def _checked(
    file: sf.SoundFile, frames: int, name: str, decode_frames: int | None = None, limit: int | None = None
) -> Iterator[np.ndarray]:
    """The file's samples at its own rate, (frames, channels) float32 blocks of ``frames``,
    as a microphone gives them: NaN refused, and clipped to full scale. Decoded
    ``decode_frames`` (a multiple of ``frames``) at a time, then cut; ``limit`` frames at most."""
    left = UNKNOWN_LENGTH if limit is None else limit
    # Not file.blocks: where a header claims more frames than the file holds (a truncated MP3),
    # it hands the last block out again instead of stopping.
    while left and len(
        decoded := file.read(min(decode_frames or frames, left), dtype="float32", always_2d=True)
    ):
        left -= len(decoded)
        for block in (decoded[start : start + frames] for start in range(0, len(decoded), frames)):
            if not np.isfinite(block).all():
                raise AudioError(f"{name}: holds NaN or infinite samples")
            # Float formats can hold values far beyond full scale; a converter would clip them.
            yield np.clip(block, -1.0, 1.0, out=block)


def _blocks(
    source, name: str, block_seconds: float = BLOCK_SECONDS, max_seconds: float | None = None
) -> Iterator[np.ndarray]:
    """The audio of ``source`` at SAMPLE_RATE, decoded ``block_seconds`` (at most BLOCK_VALUES
    samples) at a time."""
    with _decoding(name), sf.SoundFile(source) as file:
        _check_header(file, name, max_seconds)
        frames = _decode_frames(file, block_seconds)
        stream, converted = ModelRate(file.samplerate), 0
        for block in _checked(file, frames, name):
            samples = stream.convert(block)
            converted += len(samples)
            yield samples
        rest = stream.finish()
        yield rest
        if not converted + len(rest):
            raise AudioError(
                f"{name}: too short to hold a sample at {SAMPLE_RATE} Hz (its rate is {file.samplerate} Hz)"
            )


def _existing(path: str | Path) -> bytes:
    """``path`` as soundfile opens it, else AudioError saying why it cannot be read. As bytes: a
    name that is not UTF-8 (b"caf\xe9.wav" from an old Latin-1 disk) would fail to encode."""
    if Path(path).is_dir():
        raise AudioError(f"{path}: a folder, not an audio file")
    if not Path(path).exists():
        raise AudioError(f"{path}: no such file")
    if not Path(path).is_file():  # a device or a pipe: no length to read ahead, no rewinding
        raise AudioError(
            f"{path}: not a regular file; save the audio to a file first, or pipe it to standard input as -"
        )
    if not os.access(path, os.R_OK):  # libsndfile would say only "System error"
        raise AudioError(f"{path}: no permission to read it; check its owner and mode (ls -l)")
    if not Path(path).stat().st_size:  # libsndfile would blame the format
        raise AudioError(f"{path}: an empty file (0 bytes)")
    return os.fsencode(path)


def load(path: str | Path) -> np.ndarray:
    """Read an audio file as mono float32 samples at SAMPLE_RATE; AudioError if unusable."""
    return np.concatenate(list(_blocks(_existing(path), str(path))))


def blocks(path: str | Path, seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """The samples ``load`` returns, decoded ``seconds`` at a time as they are used, so that a
    recording of hours never sits in memory whole; AudioError if unusable, possibly midway."""
    return _blocks(_existing(path), str(path), seconds)


class NativeAudio:
    """Audio at its own rate and channels, checked and clipped as ``load``'s is, read in blocks
    as a microphone delivers them: a file, or with ``path`` None the WAV another program writes
    to standard input (arecord, ffmpeg -f wav -), read as it arrives. The header is read and
    checked at once; ``blocks`` reads the rest, once, and closes it."""

    def __init__(self, path: str | Path | None):
        self.live = path is None
        self.name = STDIN_NAME if self.live else str(path)
        self._limit = None  # frames: a pipe's WAV header gives them only for a file catted in
        if self.live and not _regular_file(sys.stdin.fileno()):
            self._file, self._limit = _piped_wav()
            check = _check_channels_and_rate
        else:
            source = _rewound_stdin() if self.live else _existing(path)
            with _decoding(self.name):
                self._file = sf.SoundFile(source, closefd=False)  # standard input stays open
            check = functools.partial(_check_header, max_seconds=None)
        try:
            check(self._file, self.name)
        except AudioError:
            self._file.close()
            raise
        self.samplerate = self._file.samplerate
        self.channels = self._file.channels

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        """(frames, channels) float32 blocks."""
        with _decoding(self.name), self._file as file:
            # A file is decoded in blocks as large as load's: libmpg123 logs a decoding error on
            # stderr for many reads of a few milliseconds (the audio comes out right all the
            # same). A pipe's block is read as soon as it has arrived, as a microphone's is.
            decode = frames if self.live else max(1, _decode_frames(file) // frames) * frames
            yield from _checked(file, frames, self.name, decode, self._limit)


def _regular_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _rewound_stdin() -> int:
    """Standard input redirected from a file (kws listen --file - < talk.wav), at its start:
    libsndfile takes a file it opens part way in for one embedded in another, which its raw
    reader refuses."""
    stdin = sys.stdin.fileno()
    os.lseek(stdin, 0, os.SEEK_SET)
    return stdin


def _piped_wav() -> tuple[sf.SoundFile, int | None]:
    """Standard input's WAV: its header read here, its samples opened as raw audio for
    libsndfile, with the frames its header gives (None where the size is a placeholder).

    Not libsndfile's own WAV reader: it stops at the header's size, which a writer to a pipe
    cannot know (ffmpeg's placeholder ends a 48 kHz stream after 12 h), and, waiting in C for a
    header, it would not return to Python for a signal.
    """
    stdin = sys.stdin.fileno()
    fmt, size = _wav_header(stdin)
    tag, channels, rate = struct.unpack_from("<HHI", fmt)
    (bits,) = struct.unpack_from("<H", fmt, 14)
    if tag == WAV_EXTENSIBLE and len(fmt) >= 26:
        (tag,) = struct.unpack_from("<H", fmt, 24)
    subtype = WAV_SUBTYPES.get((tag, bits))
    if subtype is None:
        raise AudioError(
            f"{STDIN_NAME}: WAV of format {tag} with {bits}-bit samples, which kws does not read from a "
            "pipe: pipe in PCM or float samples (ffmpeg -f wav - writes 16-bit PCM)"
        )
    with _decoding(STDIN_NAME, PIPE_ADVICE):  # a rate or channel count libsndfile refuses
        raw = sf.SoundFile(
            stdin,
            format="RAW",
            subtype=subtype,
            samplerate=rate,
            channels=channels,
            endian="LITTLE",
            closefd=False,
        )
    placeholder = size == 0 or size >= PLACEHOLDER_SIZE
    return raw, None if placeholder else size // (channels * bits // 8)


def _wav_header(fd: int) -> tuple[bytes, int]:
    """The format chunk of the WAV header at the start of ``fd``, and the size its data chunk
    gives, read up to where the samples begin."""
    riff = _read_exactly(fd, 12)
    if not riff:
        raise _pipe_error("nothing arrived (its writer ended before sending audio)")
    if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:] != b"WAVE":
        raise _pipe_error(f"not WAV audio (it begins {riff!r})")
    fmt, read = b"", 12
    while len(chunk := _read_exactly(fd, 8)) == 8:
        kind, size = struct.unpack("<4sI", chunk)
        if kind == b"data" and len(fmt) >= 16:
            return fmt, size
        if kind == b"data":
            raise _pipe_error("its WAV header gives no format before its samples")
        read += 8 + size + size % 2  # chunks are padded to even sizes
        if read > MAX_WAV_HEADER:
            raise _pipe_error(f"its WAV header runs over {MAX_WAV_HEADER:,} bytes before its samples")
        body = _read_exactly(fd, size + size % 2)
        if kind == b"fmt ":
            fmt = body
    raise _pipe_error("it ended inside its WAV header")


def _pipe_error(problem: str) -> AudioError:
    return AudioError(f"{STDIN_NAME}: {problem}: {PIPE_ADVICE}")


def _read_exactly(fd: int, count: int) -> bytes:
    """``count`` bytes of ``fd``, fewer at its end. Waiting in steps for a signal that another
    thread received: Ctrl-C must stop a wait for a writer that sends nothing."""
    data = b""
    waiting = select.poll() if hasattr(select, "poll") else None  # Windows has none
    if waiting is not None:
        waiting.register(fd, select.POLLIN)
    while len(data) < count:
        while waiting is not None and not waiting.poll(100):
            pass
        if not (more := os.read(fd, count - len(data))):
            break
        data += more
    return data


def info(path: str | Path):
    """A file's header (``samplerate``, ``channels``, ``duration``); AudioError if unusable, as
    ``load`` would find it before decoding a sample."""
    with _decoding(str(path)):
        header = sf.info(_existing(path))
    _check_header(header, str(path), None)
    return header


def duration(path: str | Path) -> float:
    """Seconds of audio in a file, from its header."""
    return info(path).duration


def decode(data: bytes, name: str = "audio", max_seconds: float | None = None) -> np.ndarray:
    """Decode audio file bytes (WAV, FLAC, OGG, ...) like ``load``; TooLong if the header says
    the recording lasts over ``max_seconds``, or holds more samples than that many seconds may."""
    return np.concatenate(list(decoded_blocks(data, name, max_seconds)))


def decoded_blocks(
    data: bytes, name: str = "audio", max_seconds: float | None = None
) -> Iterator[np.ndarray]:
    """The samples ``decode`` returns, ``BLOCK_SECONDS`` at a time as they are used (``blocks``
    for bytes): an hour's upload never sits in memory decoded whole."""
    if not data:
        raise AudioError(f"{name}: is empty")
    yield from _blocks(io.BytesIO(data), name, max_seconds=max_seconds)


def fix_length(samples: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Pad with zeros at the end or trim the end to ``length`` samples (the reference recipe)."""
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


def is_audio_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


def audio_files_under(folder: Path, others: list[Path] | None = None) -> list[Path]:
    """Every audio file in ``folder`` and its subfolders but hidden ones and lost+found, sorted
    (AudioError for a folder that cannot be read); the other files (not hidden) are added to
    ``others`` if given. Linked folders are followed (data sets are often linked in), each real
    folder once: a link to a parent would go round for ever."""
    found, seen = [], set()

    def unreadable(error: OSError):  # os.walk would leave the folder out without a word
        raise AudioError(
            f"cannot read the folder {error.filename} ({error.strerror}): check its mode (ls -ld)"
        ) from None

    for root, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        # Hidden folders (.Trash-1000) and a disk's lost+found hold no recordings of the user's, and
        # are often unreadable. Real folders before links, so that a folder also linked beside it
        # keeps its own name.
        folders[:] = [name for name in folders if not name.startswith(".") and name != "lost+found"]
        folders.sort(key=lambda name: (os.path.islink(os.path.join(root, name)), name))
        for path in (Path(root, name) for name in names):
            if is_audio_file(path):
                found.append(path)
            elif others is not None and not path.name.startswith("."):
                others.append(path)
    return sorted(found)
