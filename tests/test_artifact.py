"""The artifact file: round trip, the packed weight layout, and rejection of bad files."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from compile_nets import CONFIG, compile_net, raw_images

from sw import packing
from sw.compile import (
    CorruptArtifactError,
    IncompatibleArtifactError,
    TruncatedArtifactError,
    VersionMismatchError,
    golden,
    load,
    save,
)
from sw.compile.artifact import FORMAT_VERSION, HEADER, MAGIC, from_bytes, to_bytes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["melius", "abc"])
def compiled(request):
    model, artifact = compile_net(request.param, 0)
    return model, artifact, to_bytes(artifact)


def test_round_trip(compiled, tmp_path):
    _, artifact, data = compiled
    path = tmp_path / "model.bnn"
    save(artifact, path)
    loaded = load(path, CONFIG)
    assert path.read_bytes() == data
    assert loaded.class_names == artifact.class_names
    assert loaded.preprocessing == artifact.preprocessing
    assert loaded.hardware == artifact.hardware
    for a, b in zip(artifact.program.ops, loaded.program.ops, strict=True):
        assert (a.kind, a.name, a.inputs, a.output, a.mode, a.attrs) == (
            b.kind, b.name, b.inputs, b.output, b.mode, b.attrs)
        for key, value in a.params.items():
            assert np.array_equal(value, b.params[key]), f"{a.name}.{key} differs"
    raw = raw_images(7, 8, artifact.preprocessing["input_size"])
    assert torch.equal(golden.run(artifact, raw), golden.run(loaded, raw))
    assert to_bytes(loaded) == data


def test_binary_weights_use_the_hardware_layout(compiled):
    model, artifact, data = compiled
    (_, _, _, _, meta_len) = HEADER.unpack_from(data)
    meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
    blob = data[HEADER.size + meta_len:-4]
    op_meta = next(o for o in meta["ops"] if o["kind"] == "bconv")
    op = next(o for o in artifact.program.ops if o.kind == "bconv")
    entry = op_meta["params"]["weight_bits"]
    stored = blob[entry["offset"]:entry["offset"] + entry["nbytes"]]
    words = packing.pack_weights(op.params["weight_bits"], CONFIG.rows, CONFIG.lane,
                                 encoding="bit")
    assert stored == packing.words_to_bytes(words, CONFIG.rows * CONFIG.lane)
    # And the bits are the model's weight signs (the first binary layer of the network).
    first = next(m for m in model.modules() if hasattr(m, "weight_signs"))
    signs = first.weight_signs()
    expected = (signs.reshape(-1, op.params["weight_bits"].shape[1]) > 0).numpy()
    assert np.array_equal(op.params["weight_bits"], expected)


@pytest.mark.parametrize("keep", [0, 5, 8, 12, HEADER.size, HEADER.size + 30, -1])
def test_truncated(compiled, keep):
    data = compiled[2]
    cut = data[:keep] if keep >= 0 else data[:-1]
    with pytest.raises(TruncatedArtifactError, match="is truncated"):
        from_bytes(cut)


def test_bad_magic(compiled):
    data = b"NOTANART" + compiled[2][8:]
    with pytest.raises(CorruptArtifactError, match="bad magic"):
        from_bytes(data)


def test_other_version(compiled):
    data = bytearray(compiled[2])
    struct.pack_into("<H", data, len(MAGIC), FORMAT_VERSION + 1)
    body = bytes(data[:-4])
    data[-4:] = struct.pack("<I", zlib.crc32(body))
    with pytest.raises(VersionMismatchError,
                       match=f"format version {FORMAT_VERSION + 1}; this compiler reads "
                             f"version {FORMAT_VERSION}"):
        from_bytes(bytes(data))


@pytest.mark.parametrize("where", [HEADER.size + 3, -100, -2])
def test_corrupt(compiled, where):
    data = bytearray(compiled[2])
    data[where] ^= 0x10
    with pytest.raises(CorruptArtifactError, match="CRC-32"):
        from_bytes(bytes(data))


def test_trailing_bytes(compiled):
    with pytest.raises(CorruptArtifactError, match="3 trailing bytes"):
        from_bytes(compiled[2] + b"abc")


def test_incompatible_hardware(compiled, tmp_path):
    path = tmp_path / "model.bnn"
    path.write_bytes(compiled[2])
    with pytest.raises(IncompatibleArtifactError, match="packed for rows = 4, the device has "
                                                        "rows = 8"):
        load(path, CONFIG.replace(rows=8))
    with pytest.raises(IncompatibleArtifactError, match="does not fit the device: .*INTS"):
        load(path, CONFIG.replace(int_depth=512))


def test_shared_weight_bases_are_stored_once():
    _, artifact = compile_net("abc", 0)
    data = to_bytes(artifact)
    (_, _, _, _, meta_len) = HEADER.unpack_from(data)
    meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
    offsets = {}
    for op in meta["ops"]:
        if op["kind"] == "bconv":
            layer = op["name"].rsplit(".", 1)[0]
            offsets.setdefault(layer, set()).add(op["params"]["weight_bits"]["offset"])
    assert offsets and all(len(v) == 1 for v in offsets.values()), offsets
