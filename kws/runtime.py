"""Running an exported model without TensorFlow: a .tflite and its manifest, through ai_edge_litert."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from scipy.special import softmax

from kws import KwsError, features
from kws.stream import detection_config

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"  # a training run's settings, in its folder
MODEL_FILE = "model.keras"  # a training run's best model, in its folder
METADATA_NAME = "kws_manifest"  # the manifest's copy inside each exported .tflite
EXPORT_FOLDER = "export"  # where `kws export RUN` writes by default
BUILT_IN_MODEL = Path(__file__).parent / "models" / "default"  # used when no --model is given
# What an exported model's output holds (the manifest's output.values). Exports end with the
# logits, and the runtime applies the softmax in float: an int8 softmax output saturates at
# 255/256, so thresholds above 0.996 could not tell a sure keyword from a near one. A manifest
# without output.values is an older export, whose model applies the softmax itself.
LOGITS = "logits"
PROBABILITIES = "probabilities"
EXPORT_AGAIN = "export the model again with kws export"


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++ logging on fd 2 (LiteRT's delegate notice, the converter, TFLM); yields the sink."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class ModelError(KwsError, ValueError):
    """A model path that cannot be loaded; the message says what is missing."""


def quantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float -> int8 as TFLite's Quantize op: round half away from zero, then clamp."""
    scaled = np.asarray(values, dtype=np.float32) / np.float32(scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(rounded + zero_point, -128, 127).astype(np.int8)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (values.astype(np.float32) - zero_point) * np.float32(scale)


def embedded_manifest(tflite: bytes) -> dict | None:
    """The manifest ``kws export`` stores in a .tflite's metadata, if it has one."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


def embed_manifest(tflite: bytes, manifest: dict) -> bytes:
    """The .tflite with ``manifest`` stored as its metadata entry (replacing an older copy)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    payload = np.frombuffer(json.dumps(manifest, separators=(",", ":")).encode(), dtype=np.uint8)
    entries = [e for e in model.metadata or [] if _is_manifest(e)]
    if entries:
        model.buffers[entries[0].buffer].data = payload
    else:
        buffer = schema.BufferT()
        buffer.data = payload
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    return _packed(model, len(tflite) + len(payload))


def without_manifest(tflite: bytes) -> bytes:
    """The .tflite without the manifest in its metadata, for a device, which never reads it. Its
    buffer stays, emptied, so that no other buffer's index moves."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    for entry in model.metadata or []:
        if _is_manifest(entry):
            model.buffers[entry.buffer].data = None
    model.metadata = [entry for entry in model.metadata or [] if not _is_manifest(entry)] or None
    return _packed(model, len(tflite))


def _is_manifest(entry) -> bool:
    return entry.name in (METADATA_NAME, METADATA_NAME.encode())


def _packed(model, size: int) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(size + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _read_manifest(manifest_file: Path) -> dict:
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{manifest_file} is not valid JSON ({error}): {EXPORT_AGAIN}") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{manifest_file} holds no manifest object: {EXPORT_AGAIN}")
    return manifest


def model_digest(content: bytes) -> str:
    """SHA-256 of a run's model file: what its export records, to tell when training replaced it."""
    return hashlib.sha256(content).hexdigest()


def _warn_if_stale(manifest_file: Path, manifest: dict) -> None:
    """Say so when an export in a run's folder was made from an earlier model of the run than the
    one it holds now (training went on)."""
    run_dir = manifest_file.parent.parent
    model_file = run_dir / MODEL_FILE
    if (
        manifest_file.parent.name != EXPORT_FOLDER
        or not (run_dir / CONFIG_FILE).exists()
        or not model_file.exists()
    ):
        return
    exported = (manifest.get("training") or {}).get("model_sha256")
    if exported:
        stale = model_digest(model_file.read_bytes()) != exported
    else:  # exports from before the digest was recorded: the file times are all there is
        stale = model_file.stat().st_mtime > manifest_file.stat().st_mtime
    if stale:
        print(
            f"warning: {run_dir / EXPORT_FOLDER} was exported from an earlier {model_file}, which training "
            f"has replaced since: run `kws export {run_dir}` to use the newer model",
            file=sys.stderr,
        )


def resolve(path: str | Path | None, named: str = "model") -> tuple[Path, dict]:
    """The .tflite a ``--model`` path names (an export folder or a .tflite) and its manifest.

    No path means the model built into the package. The manifest is read from
    manifest.json beside the model, else from the model's metadata. ``named`` is how the user
    gave the path (``--model`` or an environment variable), for the errors.
    """
    if path is None:
        if not (BUILT_IN_MODEL / MANIFEST_FILE).exists():
            raise ModelError("this kws has no built-in model: pass --model (an export folder or .tflite)")
        path = BUILT_IN_MODEL
    path = Path(path)
    if not path.exists():
        raise ModelError(
            f"{named} {path} does not exist (expected a .tflite file or a folder made by kws export)"
        )
    if path.is_dir():
        manifest_file = path / MANIFEST_FILE
        if not manifest_file.exists() and (path / EXPORT_FOLDER / MANIFEST_FILE).exists():
            manifest_file = path / EXPORT_FOLDER / MANIFEST_FILE  # a run folder, exported in place
        if not manifest_file.exists():
            trained = (path / CONFIG_FILE).exists()
            raise ModelError(
                f"{path} holds no {MANIFEST_FILE}: pass a folder made by `kws export`"
                + (f", or export this run first with `kws export {path}`" if trained else "")
            )
        manifest = _read_manifest(manifest_file)
        # Folders only: the commands that resolve a model once hand its .tflite on to be loaded
        # again, which must not warn a second time.
        _warn_if_stale(manifest_file, manifest)
        try:
            model_file = manifest_file.parent / manifest["files"]["int8"]
        except (KeyError, TypeError):
            raise ModelError(f"{manifest_file} names no model under files.int8: {EXPORT_AGAIN}") from None
        if not model_file.is_file():
            raise ModelError(f"{model_file}, which {manifest_file} names, is missing: {EXPORT_AGAIN}")
        if path != BUILT_IN_MODEL:  # whose files a test checks; the check costs every start 15 ms
            _check_same_model(model_file, manifest, manifest_file)
        return model_file, manifest
    if path.name == MODEL_FILE:  # a run's Keras model, which only training and export read
        raise ModelError(
            f"{named} {path} is a run's Keras model: export the run with `kws export {path.parent}` and "
            f"pass {path.parent / EXPORT_FOLDER} (kws eval also scores the run folder itself)"
        )
    if path.suffix != ".tflite":
        raise ModelError(f"{named} {path}: expected a .tflite file or a folder made by kws export")
    manifest_file = path.with_name(MANIFEST_FILE)
    if manifest_file.exists():
        manifest = _read_manifest(manifest_file)
        _check_same_model(path, manifest, manifest_file)
        return path, manifest
    try:
        manifest = embedded_manifest(path.read_bytes())
    except Exception as error:  # the flatbuffer reader fails in many ways on bytes that are not a model
        raise ModelError(f"{path} is not a TFLite model ({error}): pass one made by kws export") from None
    if manifest is None:
        raise ModelError(
            f"{path} has no {MANIFEST_FILE} beside it and none inside: export it with kws export"
        )
    return path, manifest


def _check_manifest_types(manifest: dict, source: str) -> None:
    """ModelError for a manifest edited into the wrong shape (labels that are not names, a section
    that is not an object), which would fail later with a traceback."""
    labels = manifest["labels"]
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        raise ModelError(
            f"{source}: its manifest's labels are {labels!r}, not a list of names: {EXPORT_AGAIN}"
        )
    for section in ("frontend", "output", "detection"):
        if section in manifest and not isinstance(manifest[section], dict):
            raise ModelError(
                f"{source}: its manifest's {section} is {manifest[section]!r}, not an object: {EXPORT_AGAIN}"
            )


def _check_same_model(path: Path, manifest: dict, manifest_file: Path) -> None:
    """ModelError if the .tflite's own manifest (inside it) is another model's than the one beside
    it: its scores would be read with another model's labels and thresholds."""
    try:
        inside = embedded_manifest(path.read_bytes())
    except Exception:  # not a model at all: loading it says so
        return
    if not isinstance(inside, dict):
        return
    differing = [k for k in ("name", "created", "labels") if inside.get(k) != manifest.get(k)]
    if differing:
        raise ModelError(
            f"{path} is another model than {manifest_file} beside it describes ("
            + "; ".join(f"{k} {inside.get(k)!r} inside it, {manifest.get(k)!r} beside it" for k in differing)
            + f"): keep each .tflite with the {MANIFEST_FILE} kws export wrote beside it, or alone (its "
            "manifest is inside it)"
        )


class Model:
    """A .tflite keyword model: MFCC features in, class probabilities out."""

    def __init__(
        self,
        tflite: str | Path | bytes,
        manifest: dict,
        reference_kernels: bool = False,
        source: str | None = None,
    ):
        """``reference_kernels``: TFLite's reference ops instead of XNNPACK; slower, but they round
        as TFLite Micro does: outputs then match a device's but for a rare step of one (3 in 10,000).
        ``source``: where ``tflite`` bytes came from, for messages."""
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.source = source or ("<bytes>" if isinstance(tflite, bytes) else str(tflite))
        missing = [key for key in ("labels", "frontend") if key not in manifest]
        if missing:
            raise ModelError(f"{self.source}: its manifest has no {' or '.join(missing)}: {EXPORT_AGAIN}")
        _check_manifest_types(manifest, self.source)
        self.manifest = manifest
        self.labels: list[str] = manifest["labels"]
        self.output_values = manifest.get("output", {}).get("values", PROBABILITIES)
        if self.output_values not in (LOGITS, PROBABILITIES):
            raise ModelError(
                f"{self.source}: its manifest's output.values is {self.output_values!r}, expected "
                f"{LOGITS!r} or {PROBABILITIES!r}: {EXPORT_AGAIN}"
            )
        features.check_compatible(manifest["frontend"], self.source)
        # Kept so that other processes can run exactly this model, whatever happens to its file later.
        self.content = tflite if isinstance(tflite, bytes) else Path(tflite).read_bytes()
        # Tells copies apart in answers: every retrained or recalibrated copy keeps its name and
        # kws version, and calibration writes its thresholds into the .tflite too.
        self.sha256 = model_digest(self.content)
        resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
        self._interpreter_lock = threading.Lock()
        try:
            with quiet_stderr():
                self._interpreter = Interpreter(
                    model_content=self.content,
                    num_threads=1,  # a model this small gains nothing from more
                    experimental_op_resolver_type=resolver,
                )
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ModelError(
                f"{self.source} is not a model LiteRT can run ({error}): pass a .tflite made by kws export"
            ) from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        expected = (1, features.NUM_FRAMES, features.NUM_MFCC)
        if tuple(self._input["shape"]) != expected:
            raise ModelError(f"{self.source}: input shape {tuple(self._input['shape'])}, expected {expected}")
        outputs = int(self._output["shape"][-1])
        if outputs != len(self.labels):
            raise ModelError(
                f"{self.source} outputs {outputs} scores but its manifest lists {len(self.labels)} labels: "
                f"the manifest is another model's; keep each .tflite with the {MANIFEST_FILE} kws export "
                "wrote beside it"
            )
        try:  # checked here so that a bad manifest fails at load, not in every Detector made later
            detection_config(manifest)
        except (TypeError, ValueError) as error:
            raise ModelError(
                f"{self.source}: its manifest's detection settings are unusable ({error}): {EXPORT_AGAIN}"
            ) from None

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        reference_kernels: bool = False,
        named: str = "model",
    ) -> Model:
        """The model at ``path``: a folder made by kws export, or a .tflite with the manifest.json
        kws export wrote beside it; None, the built-in model. ``named``: how messages call it."""
        tflite, manifest = resolve(path, named)
        return cls(tflite, manifest, reference_kernels)

    @property
    def identity(self) -> dict:
        """What answers name the model by: its name, the kws version that exported it, its SHA-256."""
        return {
            "name": self.manifest.get("name"),
            "version": self.manifest.get("kws_version"),
            "sha256": self.sha256,
        }

    @property
    def quantized(self) -> bool:
        return self._input["dtype"] == np.int8

    def tensor_spec(self, which: str) -> dict:
        """Shape, dtype and quantization of the "input" or "output" tensor (and what the output
        holds), for manifests."""
        details = self._input if which == "input" else self._output
        scale, zero_point = details["quantization"]
        spec = {
            "shape": [int(v) for v in details["shape"]],
            "dtype": np.dtype(details["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zero_point),
        }
        return spec if which == "input" else {**spec, "values": self.output_values}

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """Features as the model's input tensor wants them (int8 for a quantized model)."""
        if self.quantized:
            scale, zero_point = self._input["quantization"]
            return quantize(batch, scale, zero_point)
        return np.asarray(batch, dtype=np.float32)

    def raw_scores(self, prepared: np.ndarray) -> np.ndarray:
        """Output tensors as they are (int8 for a quantized model) for prepared inputs (n, 49, 10)."""
        out = np.empty((len(prepared), len(self.labels)), dtype=self._output["dtype"])
        with self._interpreter_lock:  # Detectors on several threads may share a Model
            for row, example in enumerate(prepared):
                self._interpreter.set_tensor(self._input["index"], example[None])
                self._interpreter.invoke()
                out[row] = self._interpreter.get_tensor(self._output["index"])[0]
        return out

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """Output tensor values -> float probabilities."""
        if self._output["dtype"] == np.int8:
            values = dequantize(raw, *self._output["quantization"])
        else:
            values = raw.astype(np.float32)
        return softmax(values, axis=-1) if self.output_values == LOGITS else values

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """(n, NUM_FRAMES, NUM_MFCC) or one (NUM_FRAMES, NUM_MFCC) -> (n, labels) probabilities."""
        batch = np.asarray(batch)
        if batch.ndim == 2:
            batch = batch[None]
        if batch.shape[1:] != (features.NUM_FRAMES, features.NUM_MFCC):
            raise ValueError(
                f"scores takes MFCC windows of shape (n, {features.NUM_FRAMES}, {features.NUM_MFCC}), got "
                f"{batch.shape}: for audio, use a Detector, or features.mfcc for one clip"
            )
        return self.probabilities(self.raw_scores(self.prepare(batch)))
