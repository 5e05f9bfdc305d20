"""The artifact file: a compiled model (program, packed weights, parameters, preprocessing).

Layout (little-endian; see ``docs/artifact.md``)::

    offset  size  field
    0       8     magic b"BNNACCEL"
    8       2     format version (FORMAT_VERSION)
    10      2     reserved, 0
    12      8     total file length in bytes, CRC included
    20      4     metadata length L
    24      L     metadata: UTF-8 JSON (hardware requirements, preprocessing, class names,
                  tensors, ops; each parameter as {dtype, shape, offset, nbytes} into the blob)
    24+L    ...   blob: parameters; binary weights as WEIGHTS words of sw.packing
    end-4   4     CRC-32 (zlib) of every byte before it
"""

import dataclasses
import json
import pathlib
import struct
import zlib

import numpy as np

from sw import packing

from .ir import Op, Program, Slice, TensorSpec
from .lower import CompileError
from .plan import check_hardware

__all__ = [
    "FORMAT_VERSION", "MAGIC", "Artifact", "ArtifactError", "CorruptArtifactError",
    "IncompatibleArtifactError", "TruncatedArtifactError", "VersionMismatchError",
    "from_bytes", "load", "save", "to_bytes",
]

MAGIC = b"BNNACCEL"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHQI")
CRC = struct.Struct("<I")


class ArtifactError(ValueError):
    """A file is not a usable artifact (the subclass and the message say why)."""


class TruncatedArtifactError(ArtifactError):
    """The file is shorter than its header says."""


class CorruptArtifactError(ArtifactError):
    """Bad magic, bad CRC, trailing bytes or unreadable metadata."""


class VersionMismatchError(ArtifactError):
    """The file is of another format version."""


class IncompatibleArtifactError(ArtifactError):
    """The artifact needs more than (or other than) the target hardware has."""


@dataclasses.dataclass
class Artifact:
    """A compiled model.

    Members
    -------
    program : Program
    hardware : dict
        Requirements: ``rows`` and ``lane`` (the packing layout of the binary weights), ``cols``,
        ``max_depth`` (longest dot product in bits), ``activation_bytes`` (the memory plan's
        peak), ``weight_bytes`` (largest layer's weights).
    preprocessing : dict
        ``mean``, ``std`` (per channel, raw pixel units), ``pixel_range``, ``input_size``,
        ``in_channels``, ``layout`` ("NCHW").
    class_names : list of str
    plan : dict
        ``{tensor: [offset, nbytes]}`` in activation memory.
    """
    program: Program
    hardware: dict
    preprocessing: dict
    class_names: list
    plan: dict


def _unpack_weights(data, out_c, k_bits, rows, lane):
    m_tiles, k_words = -(-out_c // rows), -(-k_bits // lane)
    width = rows * lane
    raw = np.frombuffer(data, dtype=np.uint8).reshape(m_tiles * k_words,
                                                      packing.word_bytes(width))
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :width].astype(bool)
    tiles = bits.reshape(m_tiles, k_words, rows, lane).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles.reshape(m_tiles * rows, k_words * lane)[:out_c, :k_bits])


def to_bytes(artifact):
    """Serialize ``artifact`` (see the module documentation for the layout)."""
    rows, lane = artifact.hardware["rows"], artifact.hardware["lane"]
    blob = bytearray()
    stored = {}

    def put(array, name):
        if name == "weight_bits":
            words = packing.pack_weights(array, rows, lane, encoding="bit")
            data = packing.words_to_bytes(words, rows * lane)
            entry = {"dtype": "packed", "shape": list(array.shape)}
        else:
            array = np.ascontiguousarray(array)
            dtype = {"b": "<i1", "i": "<i8"}.get(array.dtype.kind)
            if dtype is None:
                raise ValueError(f"parameter {name} has dtype {array.dtype}, not an integer")
            data = array.astype(dtype).tobytes()
            entry = {"dtype": dtype, "shape": list(array.shape)}
        # Identical parameters (the weight bases an ABC-Net layer applies to each of its
        # activation bases) are stored once.
        offset = stored.get(data)
        if offset is None:
            offset = stored[data] = len(blob)
            blob.extend(data)
        entry.update(offset=offset, nbytes=len(data))
        return entry

    program = artifact.program
    meta = {
        "hardware": artifact.hardware,
        "preprocessing": artifact.preprocessing,
        "class_names": list(artifact.class_names),
        "plan": artifact.plan,
        "input": program.input,
        "logits": program.logits,
        "tensors": [{"name": t.name, "shape": list(t.shape), "kind": t.kind, "bits": t.bits,
                     "signed": t.signed,
                     "scale": None if t.scale is None else [float(v) for v in t.scale]}
                    for t in program.tensors.values()],
        "ops": [{"kind": op.kind, "name": op.name,
                 "inputs": [[s.tensor, s.start, s.stop] for s in op.inputs],
                 "output": [op.output.tensor, op.output.start, op.output.stop],
                 "mode": op.mode, "attrs": op.attrs,
                 "params": {k: put(v, k) for k, v in op.params.items()}}
                for op in program.ops],
    }
    text = json.dumps(meta, separators=(",", ":")).encode()
    total = HEADER.size + len(text) + len(blob) + CRC.size
    body = HEADER.pack(MAGIC, FORMAT_VERSION, 0, total, len(text)) + text + bytes(blob)
    return body + CRC.pack(zlib.crc32(body))


def from_bytes(data, *, source="artifact"):
    """Parse an artifact; raise an :class:`ArtifactError` subclass that says what is wrong."""
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC[:len(data)] or (len(data) >= len(MAGIC)
                                                  and data[:len(MAGIC)] != MAGIC):
        raise CorruptArtifactError(f"{source} is not a bnn-accel artifact: bad magic "
                                   f"{data[:len(MAGIC)]!r} (expected {MAGIC!r})")
    if len(data) >= len(MAGIC) + 2:
        version = struct.unpack_from("<H", data, len(MAGIC))[0]
        if version != FORMAT_VERSION:
            raise VersionMismatchError(f"{source} is artifact format version {version}; this "
                                       f"compiler reads version {FORMAT_VERSION}")
    if len(data) < HEADER.size + CRC.size:
        raise TruncatedArtifactError(f"{source} is truncated: {len(data)} bytes, shorter than "
                                     f"the {HEADER.size + CRC.size}-byte header and CRC")
    _, _, _, total, meta_len = HEADER.unpack_from(data)
    if len(data) < total:
        raise TruncatedArtifactError(f"{source} is truncated: {len(data)} bytes of the "
                                     f"{total} its header gives")
    if len(data) > total:
        raise CorruptArtifactError(f"{source} has {len(data) - total} trailing bytes after "
                                   f"the {total} its header gives")
    (stored,) = CRC.unpack_from(data, total - CRC.size)
    actual = zlib.crc32(data[:total - CRC.size])
    if stored != actual:
        raise CorruptArtifactError(f"{source} is corrupt: CRC-32 {actual:#010x} does not match "
                                   f"the stored {stored:#010x}")
    try:
        meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
        blob = data[HEADER.size + meta_len:total - CRC.size]
        return _from_meta(meta, blob)
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptArtifactError(f"{source} has unreadable metadata: {error}") from error


def _from_meta(meta, blob):
    rows, lane = meta["hardware"]["rows"], meta["hardware"]["lane"]
    tensors = {}
    for t in meta["tensors"]:
        scale = None if t["scale"] is None else np.asarray(t["scale"], dtype=np.float64)
        tensors[t["name"]] = TensorSpec(t["name"], tuple(t["shape"]), t["kind"], t["bits"],
                                        scale, t["signed"])
    ops = []
    for o in meta["ops"]:
        params = {}
        for key, p in o["params"].items():
            data = blob[p["offset"]:p["offset"] + p["nbytes"]]
            if p["dtype"] == "packed":
                params[key] = _unpack_weights(data, *p["shape"], rows, lane)
            else:
                params[key] = np.frombuffer(data, dtype=p["dtype"]).reshape(
                    p["shape"]).astype(np.int8 if p["dtype"] == "<i1" else np.int64)
        ops.append(Op(o["kind"], o["name"], [Slice(*s) for s in o["inputs"]],
                      Slice(*o["output"]), o["mode"], o["attrs"], params))
    program = Program(tensors, ops, meta["input"], meta["logits"])
    return Artifact(program, meta["hardware"], meta["preprocessing"], meta["class_names"],
                    meta["plan"])


def save(artifact, path):
    """Write ``artifact`` to ``path``."""
    pathlib.Path(path).write_bytes(to_bytes(artifact))


def load(path, config=None):
    """Read an artifact; with a :class:`~hw.config.DeviceConfig`, also check that it fits.

    Raises
    ------
    TruncatedArtifactError, CorruptArtifactError, VersionMismatchError
        The file is truncated, corrupt or of another version.
    IncompatibleArtifactError
        The artifact needs more than ``config`` has.
    """
    path = pathlib.Path(path)
    artifact = from_bytes(path.read_bytes(), source=str(path))
    if config is not None:
        check_compatible(artifact, config)
    return artifact


def check_compatible(artifact, config):
    """Raise :class:`IncompatibleArtifactError` if ``artifact`` cannot run on ``config``."""
    hw = artifact.hardware
    for field in ("rows", "lane"):
        if hw[field] != getattr(config, field):
            raise IncompatibleArtifactError(
                f"the artifact's weights are packed for {field} = {hw[field]}, the device has "
                f"{field} = {getattr(config, field)}")
    try:
        check_hardware(artifact.program, config, hw["activation_bytes"])
    except CompileError as error:
        raise IncompatibleArtifactError(f"the artifact does not fit the device: {error}") \
            from error
