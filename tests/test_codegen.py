"""Code generation (sw.compile.codegen) checked against the golden model through the reference
model of the instruction set (sim.isa_model), on the seeded random networks of compile_nets."""

import copy
import dataclasses
import functools
import types

import numpy as np
import pytest
import torch
from compile_nets import CONFIG, NETS, compile_net, raw_images

from sim import isa_model
from sw import isa
from sw.compile import CompileError, golden
from sw.compile.codegen import Geometry, encode_threshold, fit_requant, generate

SEEDS = (0, 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def compiled(name, seed):
    return compile_net(name, seed)[1].program


def config(**changes):
    """CONFIG's parameters, changed."""
    values = {field.name: getattr(CONFIG, field.name) for field in dataclasses.fields(Geometry)}
    values.update(changes)
    return types.SimpleNamespace(**values)


def images_for(name, seed, count=3):
    """Random raw images plus the two extremes of the pixel range."""
    size = NETS[name][1]
    random = raw_images(seed + 3000, count, size)
    edges = torch.stack([torch.zeros(1, size, size, dtype=torch.int64),
                         torch.full((1, size, size), 16, dtype=torch.int64)])
    return torch.cat([random, edges])


def check_exact(program, device_program, images, fill=None):
    expected = golden.run(program, images).numpy()
    got = isa_model.run(device_program, images.numpy(), fill=fill)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(NETS))
def test_device_program_equals_golden(name, seed):
    program = compiled(name, seed)
    dp = generate(program, CONFIG)
    assert len(dp.segments) == 1 and len(dp.descriptors) == len(program.ops)
    images = images_for(name, seed)
    check_exact(program, dp, images)
    # Stale memory contents (a device's memories are not cleared between images) must not
    # matter: nothing is read before it is written.
    check_exact(program, dp, images[:2], fill=seed + 7)
    # One image at a time gives the same logits as a batch.
    np.testing.assert_array_equal(isa_model.run(dp, images[0].numpy()),
                                  golden.run(program, images[:1]).numpy()[0])


@pytest.mark.parametrize("rows, lane", [(3, 12), (1, 64)])
@pytest.mark.parametrize("name", ["melius-pool-shuffle", "plain", "abc"])
def test_other_array_geometries(name, rows, lane):
    """Rows that do not divide the output channels (padded row tiles) and lanes that do not
    divide the input channels (several channel words, bits past C forced to 1)."""
    program = compiled(name, 0)
    dp = generate(program, config(rows=rows, lane=lane, max_depth=4096))
    words = {op.fields["bconv_channel_words"] for op in dp.ops if op.opcode == isa.Opcode.BCONV}
    channels = {op.fields["bconv_channels"] for op in dp.ops if op.opcode == isa.Opcode.BCONV}
    assert max(words) > 1 or lane == 64
    assert any(c % lane for c in channels)
    check_exact(program, dp, images_for(name, 0, count=1), fill=5)


def test_nets_cover_every_op_form():
    """The networks above exercise every kind, add-mode binary convs, strided and padded
    windows, grouped convs and residual combines (so the exactness tests mean something)."""
    kinds, forms = set(), set()
    for name in NETS:
        program = compiled(name, 0)
        dp = generate(program, CONFIG)
        for op, info in zip(program.ops, dp.ops):
            kinds.add(op.kind)
            f = info.fields
            forms.add(("add", f.get("bconv_add", 0)))
            forms.add(("residual", f.get("fixed_residual", 0)))
            if op.kind == "conv":
                forms.add(("groups>1", op.attrs["groups"] > 1))
                forms.add(("stride2", op.attrs["stride"] == 2))
            if op.kind == "maxpool":
                forms.add(("pool pad", op.attrs["padding"] > 0))
    assert kinds == {"input", "conv", "requant", "threshold", "bconv", "combine", "maxpool",
                     "shuffle", "gap"}
    assert {("add", 1), ("residual", 1), ("groups>1", True), ("stride2", True),
            ("pool pad", True)} <= forms


@pytest.mark.parametrize("name", list(NETS))
def test_segments_split_and_stay_exact(name):
    program = compiled(name, 1)
    full = generate(program, CONFIG)
    own = {m: 0 for m in ("WEIGHTS", "COEFS", "PARAMS")}
    for op in program.ops:
        if op.kind == "bconv":
            words = generate_words(op)
            own["WEIGHTS"] = max(own["WEIGHTS"], words)
    for info in full.ops:
        own["COEFS"] = max(own["COEFS"], info.coef_words)
        own["PARAMS"] = max(own["PARAMS"], info.param_words)
    tiny = config(weight_depth=own["WEIGHTS"], coef_depth=own["COEFS"],
                  param_depth=own["PARAMS"])
    dp = generate(program, tiny)
    assert len(dp.segments) > 2
    assert [s.first for s in dp.segments] == list(
        np.cumsum([0] + [s.count for s in dp.segments[:-1]]))
    assert sum(s.count for s in dp.segments) == len(program.ops)
    depth = {"WEIGHTS": tiny.weight_depth, "COEFS": tiny.coef_depth,
             "PARAMS": tiny.param_depth}
    for number, segment in enumerate(dp.segments):
        for memory, address, words in segment.writes:
            assert address == 0 and 0 < len(words) <= depth[memory]
        ops = dp.ops[segment.first:segment.first + segment.count]
        assert all(info.segment == number for info in ops)
        loaded = {memory: len(words) for memory, _, words in segment.writes}
        assert loaded.get("WEIGHTS", 0) == sum(info.weight_words for info in ops)
        assert loaded.get("COEFS", 0) == sum(info.coef_words for info in ops)
        assert loaded.get("PARAMS", 0) == sum(info.param_words for info in ops)
    check_exact(program, dp, images_for(name, 1, count=1), fill=3)


def generate_words(op):
    """WEIGHTS words of a bconv on CONFIG: m_tiles * k * k * ceil(C / lane)."""
    k = op.attrs["kernel"]
    out_c, fan_in = op.params["weight_bits"].shape
    channels = fan_in // (k * k)
    return -(-out_c // CONFIG.rows) * k * k * -(-channels // CONFIG.lane)


@pytest.mark.parametrize("name", ["abc", "abc-pool"])
def test_abcnet_bases_share_one_weight_block(name):
    program = compiled(name, 0)
    dp = generate(program, CONFIG)
    seen = {}
    shared = 0
    for op, info in zip(program.ops, dp.ops):
        if op.kind != "bconv":
            continue
        key = op.params["weight_bits"].tobytes()
        base = info.fields["bconv_weight_base"]
        if key in seen:
            assert base == seen[key] and info.weight_words == 0
            shared += 1
        else:
            assert base not in seen.values() and info.weight_words > 0
            seen[key] = base
    n_bases = NETS[name][2]["N"]
    convs = sum(op.kind == "combine" for op in program.ops)
    assert shared == convs * (n_bases - 1)
    (weights,) = [words for memory, _, words in dp.segments[0].writes if memory == "WEIGHTS"]
    assert len(weights) == sum(generate_words(op) for op in program.ops
                               if op.kind == "bconv" and op.name.endswith(".base0"))


# -- descriptors and records -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["melius-pool-shuffle", "abc"])
def test_descriptor_fields_round_trip(name):
    program = compiled(name, 0)
    dp = generate(program, CONFIG)
    zeros = dict.fromkeys(isa.DESCRIPTOR.names, 0)
    (params,) = [words for memory, _, words in dp.segments[0].writes if memory == "PARAMS"]
    for op, info, word in zip(program.ops, dp.ops, dp.descriptors):
        fields = isa.DESCRIPTOR.unpack(word)
        assert fields == {**zeros, **info.fields}, op.name
        out = program.tensors[op.output.tensor]
        _, base, _ = dp.allocation[op.output.tensor]
        plane = out.shape[1] * out.shape[2]
        if op.kind == "bconv":
            assert fields["opcode"] == isa.Opcode.BCONV
            c = program.tensors[op.inputs[0].tensor].shape[0]
            cw = -(-c // CONFIG.lane)
            assert fields["bconv_channel_words"] == cw
            assert fields["bconv_k_words"] == op.attrs["kernel"] ** 2 * cw
            assert fields["bconv_m_tiles"] == -(-op.output.channels // CONFIG.rows)
            assert fields["bconv_out_base"] == base + op.output.start * plane
            assert fields["bconv_add"] == int(op.mode == "add")
            continue
        assert fields["opcode"] == isa.Opcode.FIXED
        records = [isa.PARAM.unpack(params[fields["fixed_param_base"] + o])
                   for o in range(fields["fixed_out_channels"])]
        src = op.inputs[0]
        _, in_base, _ = dp.allocation[src.tensor]
        in_spec = program.tensors[src.tensor]
        in_plane = in_spec.shape[1] * in_spec.shape[2]
        offsets = [r["in_offset"] - in_base - src.start * in_plane for r in records]
        if op.kind == "combine":
            m, n = op.attrs["M"], op.attrs["N"]
            assert fields["fixed_terms_c"] == m * n and fields["fixed_coef_ostride"] == 0
            assert fields["fixed_term_stride"] == op.output.channels * in_plane
            assert fields["fixed_residual"] == op.attrs["residual"]
            assert [r["res_mul"] for r in records] == list(op.params.get(
                "res_mul", [0] * len(records)))
        elif op.kind == "shuffle":
            g, c = op.attrs["groups"], src.channels
            assert offsets == [((o % g) * (c // g) + o // g) * in_plane for o in range(c)]
        elif op.kind == "threshold":
            assert fields["fixed_post"] == isa.Post.THRESHOLD
            assert fields["fixed_out_words"] == -(-op.output.channels // CONFIG.lane)
        elif op.kind == "gap":
            assert (fields["fixed_kernel_h"], fields["fixed_kernel_w"]) == in_spec.shape[1:]
            assert (fields["fixed_out_h"], fields["fixed_out_w"]) == (1, 1)
        if op.kind in ("requant", "threshold", "maxpool", "gap", "input", "combine"):
            assert offsets == [o * in_plane for o in range(op.output.channels)]


# -- errors ------------------------------------------------------------------------------------

def first_op(program, kind):
    return next(op for op in program.ops if op.kind == kind)


def test_tensor_too_wide_for_element_width():
    program = compiled("melius", 0)
    with pytest.raises(CompileError, match=r"tensor '[^']+' needs \d+ signed bits.*"
                                           r"element_width of 8"):
        generate(program, config(element_width=8))


@pytest.mark.parametrize("memory, change", [("INTS", {"int_depth": 200}),
                                            ("BITS", {"bits_depth": 3})])
def test_activation_memory_overflow(memory, change):
    program = compiled("plain", 0)
    with pytest.raises(CompileError, match=rf"^[\w.]+: tensor '[^']+' \(\d+ \w+\) overflows "
                                           rf"the {memory} memory"):
        generate(program, config(**change))


@pytest.mark.parametrize("kind, memory, change", [
    ("bconv", "WEIGHTS", {"weight_depth": 1}),
    ("conv", "COEFS", {"coef_depth": 8}),
    ("conv", "PARAMS", {"param_depth": 1}),
])
def test_op_whose_data_does_not_fit(kind, memory, change):
    program = compiled("melius", 0)
    name = first_op(program, kind).name
    with pytest.raises(CompileError, match=rf"^{name}: its \d+ {memory} words do not fit"):
        generate(program, config(**change))


def test_too_many_ops():
    program = compiled("melius", 0)
    generate(program, config(program_depth=len(program.ops)))
    with pytest.raises(CompileError, match=rf"{len(program.ops)} ops do not fit the PROGRAM"):
        generate(program, config(program_depth=len(program.ops) - 1))


def test_only_bconv_adds():
    program = copy.deepcopy(compiled("melius", 0))
    op = first_op(program, "requant")
    op.mode = "add"
    with pytest.raises(CompileError, match=rf"^{op.name}: mode 'add' is not supported"):
        generate(program, CONFIG)


def test_combine_needs_contiguous_counts():
    program = copy.deepcopy(compiled("abc", 0))
    op = first_op(program, "combine")
    op.inputs[0], op.inputs[1] = op.inputs[1], op.inputs[0]
    with pytest.raises(CompileError, match=rf"^{op.name}: the counts of base 1 .* do not follow"):
        generate(program, CONFIG)


def test_unsupported_binary_conv_and_bad_geometry():
    program = copy.deepcopy(compiled("plain", 0))
    op = first_op(program, "bconv")
    op.attrs["stride"] = 3
    with pytest.raises(CompileError, match=rf"^{op.name}: the device's binary conv supports"):
        generate(program, CONFIG)
    with pytest.raises(ValueError, match="int_depth must be a positive integer"):
        generate(program, config(int_depth=0))
    with pytest.raises(ValueError, match="element_width must be between"):
        generate(program, config(element_width=40))


# -- encodings ---------------------------------------------------------------------------------

# encode_threshold's contract, worked out by hand: signed values lie in [lo, hi]; direction +1
# means bit = x >= t, so t <= lo is always 1 and t > hi always 0; direction -1 means bit = x <= t,
# so t >= hi is always 1 and t < lo always 0; a constant compare becomes direction 0 with the
# constant bit, and direction 0 keeps bit = (t != 0).
THRESHOLD_CASES = {
    8: [  # lo = -128, hi = 127
        ((-(1 << 40), 1), (1, 0)), ((-129, 1), (1, 0)), ((-128, 1), (1, 0)),
        ((-127, 1), (-127, 1)), ((0, 1), (0, 1)), ((127, 1), (127, 1)),
        ((128, 1), (0, 0)), ((1 << 40, 1), (0, 0)),
        ((1 << 40, -1), (1, 0)), ((128, -1), (1, 0)), ((127, -1), (1, 0)),
        ((126, -1), (126, -1)), ((0, -1), (0, -1)), ((-128, -1), (-128, -1)),
        ((-129, -1), (0, 0)), ((-(1 << 40), -1), (0, 0)),
        ((0, 0), (0, 0)), ((1, 0), (1, 0)), ((2, 0), (1, 0)), ((-1, 0), (1, 0)),
    ],
    32: [  # lo = -2147483648, hi = 2147483647
        ((-2147483649, 1), (1, 0)), ((-2147483648, 1), (1, 0)),
        ((-2147483647, 1), (-2147483647, 1)), ((2147483647, 1), (2147483647, 1)),
        ((2147483648, 1), (0, 0)),
        ((2147483648, -1), (1, 0)), ((2147483647, -1), (1, 0)),
        ((2147483646, -1), (2147483646, -1)), ((-2147483648, -1), (-2147483648, -1)),
        ((-2147483649, -1), (0, 0)),
        ((0, 0), (0, 0)), ((1, 0), (1, 0)),
    ],
}


@pytest.mark.parametrize("width", sorted(THRESHOLD_CASES))
def test_threshold_encoding_edge_cases(width):
    for (t, d), expected in THRESHOLD_CASES[width]:
        got = encode_threshold(np.int64(t), np.int64(d), width)
        assert got == expected, (t, d)
        assert all(type(v) is int for v in got), (t, d)


@pytest.mark.parametrize("width", [8, 24, 32])
def test_threshold_encoding_is_equivalent_at_the_extremes(width):
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    picks = [-(1 << 40), 1 << 40, lo - 1, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi + 1,
             -(1 << width), 1 << width]
    xs = np.array(sorted({lo, lo + 1, -2, -1, 0, 1, 2, hi - 1, hi}), dtype=np.int64)
    field_low, field_high = isa.PARAM.range("threshold")
    cases = [(t, d) for t in picks for d in (1, -1)] + [(0, 0), (1, 0)]
    for t, d in cases:
        et, ed = encode_threshold(t, d, width)
        assert field_low <= et <= field_high and ed in (-1, 0, 1)
        expected = golden.execute_op(
            types.SimpleNamespace(kind="threshold", name="t", attrs={},
                                  params={"threshold": [t], "direction": [d]}),
            [torch.as_tensor(xs).view(1, 1, 1, -1)])[0, 0, 0].numpy()
        got = (xs >= et) if ed > 0 else (xs <= et) if ed < 0 else np.full(xs.shape, et != 0)
        np.testing.assert_array_equal(got.astype(np.int64), expected, err_msg=f"{(t, d)}")


def test_fit_requant_is_exact_and_fits():
    low, high = isa.PARAM.range("bias")
    acc = torch.tensor([-(1 << 20), -1000, -3, -1, 0, 1, 2, 3, 999, 1 << 20], dtype=torch.int64)
    cases = [
        (0, 3 << 46, 40, 0),            # a zero-gamma channel: constant output
        (0, -(3 << 46) - 12345, 40, 0),
        (5 << 12, 7 << 45, 40, 0),      # a common power of two
        (-3 << 20, -(9 << 44) + (1 << 20), 40, 1 << 20),
        (1234, 5678, 12, 0),            # already fits: unchanged
    ]
    res = torch.tensor([7, -7, 0, 1, -1, 100, -100, 5, 3, 2], dtype=torch.int64)
    for mul, bias, shift, res_mul in cases:
        new_mul, new_bias, new_shift, new_res_mul = fit_requant(mul, bias, shift, res_mul)
        assert low <= new_bias <= high and 0 <= new_shift <= shift
        for relu, bits in ((False, 8), (True, 8), (False, 24)):
            old = golden.requantize((acc * mul + bias + res * res_mul).view(1, 1, 1, -1),
                                    [shift], relu, bits)
            new = golden.requantize((acc * new_mul + new_bias + res * new_res_mul).view(
                1, 1, 1, -1), [new_shift], relu, bits)
            assert torch.equal(old, new), (mul, bias, shift, res_mul)
    assert fit_requant(1234, 5678, 12) == (1234, 5678, 12, 0)
    assert fit_requant(0, 3 << 46, 40) == (0, 3 << 6, 0, 0)


# -- the reference model refuses what it does not model ----------------------------------------

def test_isa_model_refuses_the_unmodeled():
    program = compiled("plain", 0)
    dp = generate(program, CONFIG)
    image = images_for("plain", 0, count=1)[0].numpy()
    bad = dataclasses.replace(dp, descriptors=[isa.DESCRIPTOR.pack(opcode=7)] + dp.descriptors[1:])
    with pytest.raises(ValueError, match="unknown opcode 7"):
        isa_model.run(bad, image)
    index = next(i for i, op in enumerate(program.ops) if op.kind == "bconv")
    fields = isa.DESCRIPTOR.unpack(dp.descriptors[index])
    fields["bconv_kernel"] = 2
    descriptors = list(dp.descriptors)
    descriptors[index] = isa.DESCRIPTOR.pack(**fields)
    with pytest.raises(ValueError, match="BCONV kernel 2"):
        isa_model.run(dataclasses.replace(dp, descriptors=descriptors), image)
    segment = dp.segments[0]
    bad = dataclasses.replace(dp, segments=[segment._replace(writes=[("FOO", 0, [1])])])
    with pytest.raises(ValueError, match="no memory 'FOO'"):
        isa_model.run(bad, image)
    with pytest.raises(ValueError, match="the segments run"):
        isa_model.run(dataclasses.replace(dp, segments=[segment._replace(count=2)]), image)
    with pytest.raises(ValueError, match="image must be"):
        isa_model.run(dp, image[:, :-1])
    small = dataclasses.replace(dp, geometry=dataclasses.replace(dp.geometry, element_width=4))
    with pytest.raises(ValueError, match="does not fit a 4-bit INTS element"):
        isa_model.run(small, image)
    assert isinstance(Geometry.from_config(CONFIG), Geometry)


def test_one_by_one_ops_see_their_map_as_one_row():
    """1x1, stride-1, unpadded FIXED ops get an (H*W)-pixel row, so the fixed-point unit's
    lane groups do not stop at row ends; other ops keep their rows. Still exact."""
    program = compiled("melius-pool-shuffle", 0)
    dp = generate(program, CONFIG)
    flat = other = 0
    for op, info in zip(program.ops, dp.ops):
        f = info.fields
        if info.opcode != isa.Opcode.FIXED:
            continue
        _, h, w = program.tensors[op.inputs[0].tensor].shape
        one_by_one = (f["fixed_kernel_h"], f["fixed_kernel_w"], f["fixed_stride"],
                      f["fixed_pad"]) == (1, 1, 1, 0)
        if one_by_one and h > 1:
            assert (f["fixed_in_h"], f["fixed_in_w"]) == (1, h * w), op.name
            assert (f["fixed_out_h"], f["fixed_out_w"]) == (1, h * w), op.name
            flat += 1
        else:
            assert (f["fixed_in_h"], f["fixed_in_w"]) == (h, w), op.name
            other += 1
    assert flat and other
    check_exact(program, dp, images_for("melius-pool-shuffle", 0, count=1))


def test_fixed_lanes_change_only_the_cycles():
    """More fixed-point lanes: the same descriptors, fewer predicted cycles for FIXED ops."""
    program = compiled("melius", 0)
    narrow = generate(program, config(fixed_lanes=0))
    wide = generate(program, config(fixed_lanes=4 * isa.int_banks(CONFIG.cols)))
    assert narrow.descriptors == wide.descriptors
    fixed = [(a.cycles, b.cycles) for a, b in zip(narrow.ops, wide.ops)
             if a.opcode == isa.Opcode.FIXED]
    assert all(b <= a for a, b in fixed) and any(b < a for a, b in fixed)
    assert [a.cycles for a in narrow.ops if a.opcode != isa.Opcode.FIXED] == \
        [b.cycles for b in wide.ops if b.opcode != isa.Opcode.FIXED]
