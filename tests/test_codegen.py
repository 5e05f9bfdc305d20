"""Code generation (sw.compile.codegen) checked against the golden model through the reference
model of the instruction set (sim.isa_model), on the seeded random networks of compile_nets."""

import copy
import dataclasses
import functools
import re
import types

import device_programs
import numpy as np
import pytest
import torch
from compile_nets import CONFIG, NETS, compile_net, raw_images
from device_programs import cnv_like_program, fused_program, single_op_program

from sim import isa_model
from sw import isa
from sw.compile import CompileError, golden
from sw.compile.codegen import Geometry, encode_threshold, fit_requant, generate
from sw.compile.ir import Op, Program, Slice, TensorSpec

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


def _unit_words(op):
    """COEFS words of the smallest piece a fixed-point conv can be split into (one output
    channel, or one group's)."""
    weight = np.asarray(op.params["weight"])
    groups = int(op.attrs["groups"])
    per_channel = int(np.prod(weight.shape[1:]))
    return per_channel * (weight.shape[0] // groups if groups > 1 else 1)


@pytest.mark.parametrize("name", list(NETS))
def test_ops_too_big_for_a_memory_are_split_and_stay_exact(name):
    """With WEIGHTS and COEFS half as large as the largest op's own data, those ops run as
    pieces of consecutive output channels (whole row tiles, whole groups) that each fit; the
    result equals golden's."""
    program = compiled(name, 1)
    full = generate(program, CONFIG)
    assert full.split == {} and full.program is program
    tile = max(info.fields.get("bconv_k_words", 0) for info in full.ops)
    unit = max([_unit_words(op) for op in program.ops if op.kind == "conv"], default=1)
    weights = max(info.weight_words for info in full.ops)
    coefs = max(info.coef_words for info in full.ops)
    tiny = config(weight_depth=max(tile, weights // 2), coef_depth=max(unit, coefs // 2, 1))
    dp = generate(program, tiny)
    assert dp.split, "nothing was split"
    pieces = [piece for names in dp.split.values() for piece in names]
    assert [op.name for op in dp.ops if op.name in pieces] == pieces
    assert len(dp.ops) == len(program.ops) + len(pieces) - len(dp.split)
    assert all(op.weight_words <= tiny.weight_depth and op.coef_words <= tiny.coef_depth
               for op in dp.ops)
    check_exact(program, dp, images_for(name, 1))


@pytest.mark.parametrize("kind", ["requant", "threshold-bconv", "bconv-add"])
def test_single_ops_split_by_output_channels(kind):
    """A requant with more channels than PARAMS records, and binary convs (written, or added
    into their output) with more row tiles than WEIGHTS words, split into pieces; exact."""
    program, images = single_op_program(kind, 3)
    full = generate(program, CONFIG)
    name = next(op.name for op in program.ops if op.kind == kind.split("-")[-1]
                or (kind == "bconv-add" and op.mode == "add"))
    info = next(op for op in full.ops if op.name == name)
    if kind == "requant":
        tiny = config(param_depth=max(1, info.param_words // 2))
    else:
        tiny = config(weight_depth=info.fields["bconv_k_words"])
    dp = generate(program, tiny)
    assert len(dp.split.get(name, [])) > 1, dp.split
    check_exact(program, dp, torch.as_tensor(images))


@pytest.mark.parametrize("seed", [0, 2, 3, 4, 5, 15, 16, 19])   # 15, 16, 19: a mul < 0
def test_a_requant_only_a_max_pool_reads_runs_after_the_pool(seed):
    """requant -> maxpool (random window, stride, padding, ReLU, saturation): with every
    ``mul >= 0`` the pool reads the requant's input and requantizes its maxima (the requant
    is a NOP and its output is not stored); with a negative ``mul`` nothing changes. Exact
    either way, also at the pixel range's ends."""
    program, images = single_op_program("requant-maxpool", seed)
    requant = next(op for op in program.ops if op.kind == "requant")
    dp = generate(program, CONFIG)
    ops = {op.name: op for op in dp.ops}
    if np.all(np.asarray(requant.params["mul"]) >= 0):
        assert dp.requants_after_pools == {"requant": "maxpool"}
        assert ops["requant"].opcode == isa.Opcode.NOP and "y" not in dp.allocation
        assert ops["maxpool"].fields["fixed_post"] == isa.Post.REQUANT
        assert ops["maxpool"].fields["fixed_reduce"] == isa.Reduce.MAX
    else:
        assert dp.requants_after_pools == {} and "y" in dp.allocation
        assert ops["requant"].opcode == isa.Opcode.FIXED
    images = torch.as_tensor(images)
    check_exact(program, dp, torch.cat([images, torch.zeros_like(images[:1]),
                                        torch.full_like(images[:1], 255)]))


def test_a_requant_read_by_another_op_too_stays():
    """The requant's output read by the pool and by another op: it is stored, and the pool
    pools it."""
    program, images = single_op_program("requant-maxpool", 0)
    requant = next(op for op in program.ops if op.kind == "requant")
    assert np.all(np.asarray(requant.params["mul"]) >= 0)
    extra = Op("gap", "gap", [requant.output], Slice("sums", 0, requant.output.stop),
               "write", {}, {})
    tensors = dict(program.tensors)
    tensors["sums"] = TensorSpec("sums", (requant.output.stop, 1, 1), "int", 16, None, True)
    two = Program(tensors, [*program.ops, extra], program.input, program.logits)
    dp = generate(two, CONFIG)
    assert dp.requants_after_pools == {} and "y" in dp.allocation
    check_exact(two, dp, torch.as_tensor(images))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_too_big_for_ints_run_piece_by_piece(seed):
    """CNV's pattern, a binary conv's counts read only by the max pool after it: with INTS one
    element too small for the whole program, the conv and the pool run piece by piece through
    a tensor of half the channels (whole row tiles); exact. (Three columns: the pool cannot
    run inside the conv's tiles, so conv2 does not go straight to bits and its counts do go
    to INTS.)"""
    program, images = cnv_like_program(60 + seed, weights="int8")
    full = generate(program, config(max_depth=8192, cols=3))
    assert full.convs_to_bits == ("conv1",) and "conv2" in full.fusion_fallback
    dp = generate(program, config(max_depth=8192, cols=3, int_depth=full.ints_used - 1))
    assert set(dp.split) == {"conv2", "conv2.pool"}
    assert program.tensors["conv2"].shape[0] > dp.program.tensors["conv2.piece"].shape[0]
    assert dp.program.tensors["conv2.piece"].shape[0] % CONFIG.rows == 0
    assert "conv2" not in dp.allocation and dp.ints_used < full.ints_used
    check_every_tensor(program, dp, images)


def test_an_op_that_cannot_be_split_small_enough_is_refused():
    program, _ = single_op_program("threshold-bconv", 3)
    full = generate(program, CONFIG)
    info = next(op for op in full.ops if op.opcode == isa.Opcode.BCONV)
    with pytest.raises(CompileError, match=f"{re.escape(info.name)}.*WEIGHTS"):
        generate(program, config(weight_depth=info.fields["bconv_k_words"] - 1))


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
    (None, "PARAMS", {"param_depth": 1}),   # the first op that cannot be split to fit
])
def test_op_whose_data_does_not_fit(kind, memory, change):
    program = compiled("melius", 0)
    name = re.escape(first_op(program, kind).name) if kind else r"[\w.]+"
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

def with_fields(dp, index, **changes):
    """`dp` with descriptor `index`'s fields changed (a program the compiler would not emit)."""
    fields = isa.DESCRIPTOR.unpack(dp.descriptors[index])
    fields.update(changes)
    descriptors = list(dp.descriptors)
    descriptors[index] = isa.DESCRIPTOR.pack(**fields)
    return dataclasses.replace(dp, descriptors=descriptors)


def test_isa_model_refuses_the_unmodeled():
    program = compiled("plain", 0)
    dp = generate(program, CONFIG)
    image = images_for("plain", 0, count=1)[0].numpy()
    bad = dataclasses.replace(dp, descriptors=[isa.DESCRIPTOR.pack(opcode=7)] + dp.descriptors[1:])
    with pytest.raises(ValueError, match="unknown opcode 7"):
        isa_model.run(bad, image)
    index = next(i for i, op in enumerate(program.ops) if op.kind == "bconv")
    with pytest.raises(ValueError, match="BCONV kernel 2"):
        isa_model.run(with_fields(dp, index, bconv_kernel=2), image)
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


# -- the first layer as bit-planes ---------------------------------------------------------------

def bits_tensor(machine, dp, program, name):
    """A bits tensor ``(C, H, W)`` read back from the isa model's BITS memory."""
    c, h, w = program.tensors[name].shape
    _, base, size = dp.allocation[name]
    words = machine.bits[base:base + size].reshape(h * w, -1)[:, :c]
    return words.T.reshape(c, h, w).astype(np.int64)


def check_every_tensor(program, dp, images, fill=None):
    """Logits and every bits tensor of the isa model (read right after the op that writes
    it) equal golden's, image by image."""
    logits, steps = golden.run(program, torch.as_tensor(images), return_intermediates=True)
    # The device program's ops (some maybe split into pieces; thresholds never are).
    generated = dp.program
    writes_bits = {i: op.name for i, op in enumerate(generated.ops)
                   if generated.tensors[op.output.tensor].kind == "bits"}
    assert writes_bits
    for index, image in enumerate(images):
        compared = []

        def compare(i, machine, index=index, compared=compared):
            if i in writes_bits:
                name = writes_bits[i]
                np.testing.assert_array_equal(
                    bits_tensor(machine, dp, program, generated.ops[i].output.tensor),
                    steps[name][index].numpy(), err_msg=name)
                compared.append(name)

        machine = isa_model.execute(dp, image, fill=fill, after_op=compare)
        assert len(compared) == len(writes_bits)
        got = machine.ints[dp.logits_base + np.arange(dp.logits_count)]
        np.testing.assert_array_equal(got, logits[index].numpy())
    return steps


PLANE_VARIANTS = {
    "valid": {},
    "padded": {"pad": 1},
    "strided": {"stride": 2},
    "padded-strided": {"pad": 1, "stride": 2},
    "normalized": {"shift": 3, "zero": True},     # x = (raw << 3) - zero, no padding
}


@pytest.mark.parametrize("variant", list(PLANE_VARIANTS))
@pytest.mark.parametrize("lane, channels", [(8, 1), (8, 2), (16, 2), (16, 3), (32, 1),
                                            (32, 3), (32, 4), (32, 5), (64, 8), (64, 9)])
def test_bitplane_first_layer_is_exact(lane, channels, variant):
    """An 8-bit input conv with +-1 weights followed by thresholds runs on the array as
    bit-planes: the input op is a NOP, the conv a BCONV with ``planes``, the raw image goes
    to BITS; the logits and every binary tensor equal golden's (channel counts 1 .. g, g + 1
    and several words per pixel; padding, stride 2, a normalizing input op)."""
    program, images = cnv_like_program(lane * 10 + channels, channels=channels,
                                       **PLANE_VARIANTS[variant])
    dp = generate(program, config(lane=lane, max_depth=16384))
    assert dp.bitplanes == "conv1" and dp.bitplane_fallback is None
    assert dp.input_memory == "BITS" and dp.allocation["image"][0] == "BITS"
    assert "input" not in dp.allocation                     # the input op stores nothing
    ops = {op.name: op for op in dp.ops}
    assert ops["input"].opcode == isa.Opcode.NOP
    assert ops["input"].cycles == isa.op_cycles(1, 1, lane, {"opcode": isa.Opcode.NOP})
    conv = ops["conv1"]
    g = lane // 8
    assert conv.opcode == isa.Opcode.BCONV and conv.fields["bconv_planes"] == 1
    assert conv.fields["bconv_channel_words"] == -(-channels // g)
    assert conv.fields["bconv_k_words"] == 9 * -(-channels // g)
    assert conv.cycles == isa.op_cycles(CONFIG.rows, CONFIG.cols, lane, conv.fields,
                                        CONFIG.fixed_lanes)
    assert all(op.fields.get("bconv_planes", 0) == 0 for op in dp.ops if op is not conv)
    steps = check_every_tensor(program, dp, images, fill=lane)
    act = steps["conv1.act"]
    assert 0 < int(act.sum()) < act.numel()        # the thresholds do split the pixels


def one_channel_programs(rng, weights, zero):
    """Per (relu, bits) case, a program: the 16x16 one-channel image through an input op
    (``x = raw - zero``), a 1x1 conv to 24 channels (``weights(rng, shape)``) with random
    requantizations (negative, zero and positive multipliers, rounding shifts, saturation,
    ReLU), thresholds in all three directions inside and beyond the range, and a bconv."""
    for relu, bits in [(0, 4), (1, 4), (0, 12), (1, 9), (0, 6), (1, 2)]:
        out = 24
        tensors = {
            "image": TensorSpec("image", (1, 16, 16), "int", 8, None, False),
            "x": TensorSpec("x", (1, 16, 16), "int", 9, None, bool(zero)),
            "y": TensorSpec("y", (out, 16, 16), "int", bits, None, not relu),
            "act": TensorSpec("act", (out, 16, 16), "bits", 1, None, False),
            "logits": TensorSpec("logits", (2, 16, 16), "int", 12, None, False),
        }
        high = (1 << bits) - 1 if relu else (1 << (bits - 1)) - 1
        low = 0 if relu else -(1 << (bits - 1))
        direction = rng.choice([-1, 1, 0], out)
        threshold = np.where(direction == 0, rng.integers(0, 2, out),
                             rng.integers(low - 3, high + 4, out))
        ops = [
            Op("input", "input", [Slice("image", 0, 1)], Slice("x", 0, 1),
               attrs={"shift": 0}, params={"zero": np.full(1, zero, np.int64)}),
            Op("conv", "conv", [Slice("x", 0, 1)], Slice("y", 0, out),
               attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": relu,
                      "bits": bits},
               params={"weight": weights(rng, (out, 1, 1, 1)),
                       "mul": rng.integers(-40, 41, out), "bias": rng.integers(-4000, 4000, out),
                       "shift": rng.integers(0, 6, out)}),
            Op("threshold", "act", [Slice("y", 0, out)], Slice("act", 0, out),
               params={"threshold": threshold, "direction": direction}),
            Op("bconv", "logits", [Slice("act", 0, out)], Slice("logits", 0, 2),
               attrs={"kernel": 1, "stride": 1, "padding": 0},
               params={"weight_bits": rng.integers(0, 2, (2, out)).astype(bool)}),
        ]
        yield Program(tensors, ops, "image", "logits")


def test_bitplane_thresholds_are_exact_for_every_count():
    """A 1x1 conv of one channel counts ``x`` (weight +1) or ``255 - x`` (-1): an image of
    every pixel value reaches every count, so the rewritten thresholds are checked against
    golden at every count, for requantizations with negative, zero and positive
    multipliers, rounding shifts, saturation, ReLU, and thresholds inside and beyond the
    range, in all three directions."""
    rng = np.random.default_rng(11)
    checked = 0
    for program in one_channel_programs(rng, lambda r, shape: r.choice([-1, 1], shape), 0):
        dp = generate(program, config(max_depth=4096))
        assert dp.bitplanes == "conv"
        image = np.arange(256).reshape(1, 1, 16, 16)
        steps = check_every_tensor(program, dp, image)
        checked += int(steps["act"].sum())
    assert checked > 0


FALLBACKS = {
    "int8 weights": ({"weights": "int8"}, {}, "not all \\+1 or -1"),
    "a pool reads the conv": ({"consumer": "maxpool"}, {}, "read by ops other than thresholds"),
    "padding a nonzero mean": ({"pad": 1, "zero": True}, {}, "pads with zero"),
    "groups": ({"groups": 3, "out1": 9}, {}, "3 groups"),
    "a 9-bit image": ({"image_bits": 9}, {}, "not unsigned 8-bit"),
    "a lane of 12 bits": ({}, {"lane": 12}, "not a multiple of 8"),
    "counts overflow": ({}, {"max_depth": 1024}, "reach 6885, more than the array's 11-bit"),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_bitplane_fallbacks_stay_on_the_fixed_point_unit(name):
    """Where the pattern does not hold, the first layer stays a fixed-point conv (the raw
    image in INTS), the device program says why, and it is exact."""
    variant, geometry, reason = FALLBACKS[name]
    program, images = cnv_like_program(5, **variant)
    dp = generate(program, config(**{"max_depth": 8192, **geometry}))
    assert dp.bitplanes is None and dp.input_memory == "INTS"
    assert re.search(reason, dp.bitplane_fallback), dp.bitplane_fallback
    ops = {op.name: op for op in dp.ops}
    assert ops["input"].opcode == ops["conv1"].opcode == isa.Opcode.FIXED
    check_every_tensor(program, dp, images[:2])


CONV_TO_BITS_VARIANTS = {
    "valid": {},
    "padded": {"pad": 1},
    "grouped": {"groups": 3, "out1": 9},
    "normalized": {"shift": 2, "zero": True},
}


@pytest.mark.parametrize("variant", list(CONV_TO_BITS_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fixed_point_conv_writes_its_thresholds_bits(variant, seed):
    """A fixed-point conv (int8 weights) whose output only a threshold reads compares its
    accumulator with rewritten thresholds and writes the bits itself: its output gets no
    memory, the threshold op is a NOP, and every bits tensor and the logits equal golden's
    (random requantizations with negative multipliers, saturation and ReLU; all three
    threshold directions)."""
    program, images = cnv_like_program(40 + seed, weights="int8",
                                       **CONV_TO_BITS_VARIANTS[variant])
    dp = generate(program, config(max_depth=8192))
    assert dp.convs_to_bits == ("conv1",)
    assert "conv1" not in dp.allocation
    ops = {op.name: op for op in dp.ops}
    assert ops["conv1"].opcode == isa.Opcode.FIXED
    assert ops["conv1"].fields["fixed_post"] == isa.Post.THRESHOLD
    assert ops["conv1.act"].opcode == isa.Opcode.NOP
    steps = check_every_tensor(program, dp, images)
    act = steps["conv1.act"]
    assert 0 < int(act.sum()) < act.numel()


def test_conv_to_bits_thresholds_are_exact_for_every_accumulator():
    """A 1x1 conv of one channel with weight ``w`` accumulates ``w * x``; an image of every
    pixel value (``x = raw - 128``) reaches every accumulator, so the rewritten compares are
    checked against golden at each, for requantizations with negative, zero and positive
    multipliers, rounding shifts, saturation, ReLU, zero weights, and thresholds inside and
    beyond the range in all three directions."""
    rng = np.random.default_rng(12)
    checked = 0
    for program in one_channel_programs(rng, lambda r, shape: r.integers(-3, 4, shape),
                                        128):
        dp = generate(program, config())
        assert dp.convs_to_bits == ("conv",) and dp.bitplanes is None
        image = np.arange(256).reshape(1, 1, 16, 16)
        steps = check_every_tensor(program, dp, image)
        checked += int(steps["act"].sum())
    assert checked > 0


def test_a_conv_read_by_other_ops_keeps_its_output():
    """A conv whose output a pool reads, one that would run fewer pixels at once (stride 2;
    fewer channels in its last BITS word than lanes), or a bit-plane conv is not fused."""
    for variant in ({"consumer": "maxpool"}, {"stride": 2}, {"out1": 35}):
        program, _ = cnv_like_program(5, weights="int8", **variant)
        assert generate(program, config(max_depth=8192)).convs_to_bits == (), variant
    program, _ = cnv_like_program(5, weights="int8", out1=40)
    assert generate(program, config(max_depth=8192)).convs_to_bits == ("conv1",)
    program, _ = cnv_like_program(5)
    dp = generate(program, config(max_depth=8192))
    assert dp.bitplanes == "conv1" and dp.convs_to_bits == ()


def test_no_bitplane_fallback_without_an_input_conv():
    dp = generate(compiled("plain", 0), CONFIG)
    assert dp.bitplanes is None and dp.input_memory == "INTS"
    assert dp.bitplane_fallback is not None        # its stem conv has int8 weights
    program, _ = single_op_program("maxpool", 0)
    dp = generate(program, CONFIG)
    assert dp.bitplanes is None and dp.bitplane_fallback is None


def test_bitplane_images_must_be_8_bit():
    program, images = cnv_like_program(1)
    dp = generate(program, CONFIG)
    assert dp.input_memory == "BITS"
    assert len(dp.input_words(images[0])) == dp.allocation["image"][2]
    for bad in (-1, 256):
        image = images[0].copy()
        image[0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            dp.input_words(image)
    with pytest.raises(ValueError, match="shape"):
        dp.input_words(images[0][:, :3])


def test_bitplane_program_streams_its_weights():
    """With WEIGHTS too small for all the weights the bit-plane program is split into
    segments and stays exact; the raw image lives (for allocation and for a batch's carried
    tensors) until the bit-plane conv reads it, not only until the input op."""
    program, images = cnv_like_program(2)
    dp = generate(program, config(weight_depth=40))
    assert dp.bitplanes == "conv1" and len(dp.segments) > 2
    conv = [op.name for op in dp.ops].index("conv1")
    assert dp.lifetimes["image"] == (-1, conv)
    check_exact(program, dp, torch.as_tensor(images[:2]))


# -- binary convs straight to bits -------------------------------------------------------------

FUSED_GEOMETRIES = {
    "4x4x32": {},
    "2x4x8": {"rows": 2, "cols": 4, "lane": 8},
    "8x4x32": {"rows": 8, "cols": 4, "lane": 32},
    "4x8x16": {"rows": 4, "cols": 8, "lane": 16},
    "1x4x4": {"rows": 1, "cols": 4, "lane": 4},
}


def check_fused_descriptors(program, dp):
    """Each fused conv is one BCONV with ``threshold`` (``pool`` for a pooled one) writing its
    threshold's bits; the threshold and the pool are NOPs; the counts are not stored; every
    op's cycles are the timing model's."""
    ops = {op.name: (index, op) for index, op in enumerate(program.ops)}
    geo = dp.geometry
    for conv, (threshold, pool) in dp.fused.items():
        index, op = ops[conv]
        f = dp.ops[index].fields
        assert dp.ops[index].opcode == isa.Opcode.BCONV
        assert isa.bconv_post(f) == (1, int(pool is not None))
        assert f["fixed_post"] == isa.Post.THRESHOLD
        assert f["fixed_out_words"] == -(-op.output.channels // geo.lane)
        bits = ops[threshold][1].output.tensor
        assert f["fixed_out_base"] == dp.allocation[bits][1]
        assert op.output.tensor not in dp.allocation
        assert dp.lifetimes[bits][0] == index
        for name in (threshold, pool):
            if name:
                assert dp.ops[ops[name][0]].opcode == isa.Opcode.NOP
                assert dp.ops[ops[name][0]].cycles == isa.SEQUENCER_CYCLES - 1
        _, oh, ow = program.tensors[op.output.tensor].shape
        assert f["bconv_out_plane"] == (4 * (oh // 2) * (ow // 2) if pool else oh * ow)
        assert dp.ops[index].param_words == op.output.channels
    for info in dp.ops:
        assert info.cycles == isa.op_cycles(geo.rows, geo.cols, geo.lane, info.fields,
                                            geo.fixed_lanes), info.name


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("geometry", list(FUSED_GEOMETRIES))
def test_fused_programs_are_exact(geometry, seed):
    """Random chains of bconv -> [2x2 max pool] -> threshold (odd maps, strides, padding,
    channels not multiples of the rows or the lane, all three directions): every bits tensor
    and the logits equal golden's with stale memories, with the convs straight to bits."""
    program, images = fused_program(seed)
    dp = generate(program, config(weight_depth=4096, bits_depth=4096,
                                  **FUSED_GEOMETRIES[geometry]))
    check_fused_descriptors(program, dp)
    if geometry in ("4x4x32", "8x4x32"):
        # Every conv but the logits' fc fuses (a tile's words: at most 4 <= rows).
        assert sorted(dp.fused) == [f"conv{i}" for i in (1, 2, 3)], dp.fusion_fallback
    check_every_tensor(program, dp, images, fill=seed)


def test_fused_pool_of_odd_maps_and_every_direction():
    """A pooled 7x7 conv output (floor: 3x3) with m_tiles > 1, thresholds of direction -1
    (AND of the compares), +1 (OR) and 0 (constant), and counts at the extremes."""
    found = set()
    for seed in range(40):
        program, images = fused_program(seed, size=9, pool=1.0, layers=1)
        conv = program.ops[3]
        if program.tensors[conv.output.tensor].shape[1] % 2 == 0:
            continue
        dp = generate(program, config(weight_depth=4096, bits_depth=4096))
        assert dp.fused == {"conv1": ("act1", "conv1.pool")}
        directions = set(program.ops[5].params["direction"].tolist())
        found |= directions
        check_every_tensor(program, dp, images)
        if found == {-1, 0, 1} and conv.output.channels > CONFIG.rows:
            break
    else:
        pytest.fail("no seed with an odd pooled map, m_tiles > 1 and every direction")


def chain_program(*, pool=(2, 2, 0), readers=1, mode="write", sliced=False, kernel=3,
                  channels=40, side=9):
    """image -> input -> conv0 -> act0 -> bconv conv1 (``kernel``; ``sliced``: a slice of a
    wider tensor; ``mode="add"``: written, then added into) -> [maxpool ``pool`` = (kernel,
    stride, padding), or none] -> act1 threshold (``readers`` > 1: more thresholds read the
    counts) -> fc -> logits."""
    b = device_programs._Builder(7)
    rng = b.rng
    image = b.tensor("image", (2, side, side), bits=8, signed=False)
    x = b.tensor("input", (2, side, side), bits=12)
    b.op("input", "input", [image], x, attrs={"shift": 0}, params={"zero": np.zeros(2)})
    wide = b.tensor("conv0", (channels, side, side), bits=12)
    b.op("conv", "conv0", [x], wide,
         attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": 0, "bits": 12},
         params={"weight": rng.integers(-127, 128, (channels, 2, 1, 1)),
                 **b.requant_params(channels, shift_high=6)})
    bits = b.tensor("act0", (channels, side, side), kind="bits", bits=1, signed=False)
    b.op("threshold", "act0", [wide], bits, params=b.thresholds(channels, -300, 300))
    side1 = side - kernel + 1
    out_c = 12
    counts = b.tensor("conv1", (out_c + 4 * sliced, side1, side1), bits=12)
    target = Slice("conv1", 4, out_c + 4) if sliced else counts
    weights = rng.integers(0, 2, (out_c, channels * kernel * kernel)).astype(bool)
    attrs = {"kernel": kernel, "stride": 1, "padding": 0}
    if mode == "add":
        b.op("bconv", "conv1.first", [bits], Slice("conv1", 0, out_c), attrs=attrs,
             params={"weight_bits": weights})
    b.op("bconv", "conv1", [bits], target, mode=mode, attrs=attrs,
         params={"weight_bits": weights})
    src = target
    if pool:
        k, stride, pad = pool
        side1 = (side1 + 2 * pad - k) // stride + 1
        src = b.tensor("conv1.pool", (out_c, side1, side1), bits=12)
        b.op("maxpool", "conv1.pool", [target], src,
             attrs={"kernel": k, "stride": stride, "padding": pad})
    n = channels * kernel * kernel
    for r in range(readers):
        out = b.tensor(f"act1.{r}", (out_c, side1, side1), kind="bits", bits=1, signed=False)
        b.op("threshold", f"act1.{r}", [src], out, params=b.thresholds(out_c, n // 2 - 4,
                                                                         n // 2 + 4))
    logits = b.tensor("logits", (10, side1, side1), bits=14)
    b.op("bconv", "fc", [out], logits, attrs={"kernel": 1, "stride": 1, "padding": 0},
         params={"weight_bits": rng.integers(0, 2, (10, out_c)).astype(bool)})
    program = Program(b.tensors, b.ops, "image", "logits")
    return program, rng.integers(0, 256, (2, 2, side, side))


FUSION_FALLBACKS = {
    "two readers": ({"readers": 2, "pool": None}, {}, r"counts 'conv1' are read by 2 ops"),
    "pooled, two readers": ({"readers": 2}, {},
                            r"pooled counts 'conv1.pool' are .* read by several ops"),
    "3x3 pool": ({"pool": (3, 1, 1)}, {}, r"not a 2x2 stride-2 max pool without padding"),
    "padded pool": ({"pool": (2, 2, 1)}, {}, r"not a 2x2 stride-2 max pool without padding"),
    "add": ({"mode": "add"}, {}, r"added to or written by other ops"),
    "slice": ({"sliced": True}, {}, r"writes a channel slice of 'conv1'"),
    "3 columns": ({}, {"cols": 3}, r"multiple of 4 columns, not 3"),
    "rows vs lane": ({"pool": None}, {"rows": 3}, r"rows \(3\) do not divide the lane"),
    "slow words": ({"pool": None, "kernel": 1, "channels": 20}, {"rows": 2, "lane": 32},
                   r"4 BITS words do not leave before the next tile's \(2 cycles\)"),
    "BITS overflow": ({"side": 11}, {"bits_depth": 250},
                      r"straight to bits the memories overflow .*BITS"),
}


@pytest.mark.parametrize("name", list(FUSION_FALLBACKS))
def test_fusion_fallbacks_keep_the_counts_in_ints(name):
    """Where the pattern or the device's conditions do not hold, the conv writes its counts
    to INTS and the threshold (and the pool) stay fixed-point ops; the device program says
    why, and it is exact."""
    variant, geometry, reason = FUSION_FALLBACKS[name]
    program, images = chain_program(**variant)
    dp = generate(program, config(**geometry))
    assert "conv1" not in dp.fused
    assert re.search(reason, dp.fusion_fallback["conv1"]), dp.fusion_fallback
    ops = {op.name: op for op in dp.ops}
    assert ops["act1.0"].opcode == isa.Opcode.FIXED
    assert isa.bconv_post(ops["conv1"].fields) == (0, 0)
    check_exact(program, dp, torch.as_tensor(images), fill=3)
    # The same program without the obstacle fuses.
    if name in ("3 columns", "rows vs lane", "slow words", "BITS overflow"):
        fused = generate(program, config(bits_depth=1024))
        assert "conv1" in fused.fused
        check_exact(program, fused, torch.as_tensor(images), fill=3)


def test_cnv_like_program_runs_every_binary_conv_straight_to_bits():
    """cnv_like_program: the bit-plane conv1 and its threshold, conv2 with its 2x2 pool and
    threshold, conv3 with its threshold fuse; only the logits' fc writes INTS."""
    program, images = cnv_like_program(11)
    dp = generate(program, CONFIG)
    assert dp.bitplanes == "conv1"
    assert dp.fused == {"conv1": ("conv1.act", None), "conv2": ("conv2.act", "conv2.pool"),
                        "conv3": ("conv3.act", None)}
    assert dp.ints_used == 10
    check_fused_descriptors(program, dp)
    check_every_tensor(program, dp, images, fill=1)


def test_cnv_w1a1_is_resident_on_the_default():
    """FINN's CNV-W1A1 (bench.networks) on the ULX3S-85F default itself, every weight resident
    (one segment, conv6 whole): straight to bits its counts never reach INTS (only the logits
    do); BITS holds the bit-plane image beside conv1's bits."""
    from bench.networks import cnv_w1a1_program
    from hw.board import get_board
    default = get_board("ulx3s", "85F").default_config
    program, images = cnv_w1a1_program()
    dp = generate(program, default)
    assert len(dp.segments) == 1 and not dp.split
    assert len(dp.fused) == 8 and not dp.fusion_fallback
    assert dp.ints_used == 10 and dp.bits_used == 2824 <= default.bits_depth
    check_exact(program, dp, torch.as_tensor(images[:1]))


def test_meliusnet_small_is_resident_on_the_default():
    """meliusnet-small at 28x28 (bench.networks) fits the ULX3S-85F default in one segment,
    every tensor within its 18-bit INTS elements (the compiler refuses a wider one)."""
    from bench.networks import meliusnet_program
    from hw.board import get_board
    default = get_board("ulx3s", "85F").default_config
    program, images = meliusnet_program(default)
    dp = generate(program, default)
    assert len(dp.segments) == 1 and not dp.split
    assert dp.ints_used <= default.int_depth and default.element_width == 18
    check_exact(program, dp, torch.as_tensor(images[:1]))


# -- parallel convs (fixed_channels) -------------------------------------------------------------

@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("name", ["melius", "melius-pool-shuffle", "abc", "plain"])
def test_parallel_convs_stay_exact(name, channels):
    """With ``fixed_channels`` > 1 the convs that allow it (sw.isa.parallel_ok) are generated
    parallel, their coefficients in channel-group order: the isa model (which checks the
    parallel rules) gives the golden output, every op's cycles are the timing model's, and no
    op takes longer than with one channel at a time."""
    program = compiled(name, 0)
    one = generate(program, config(fixed_channels=1))
    dp = generate(program, config(fixed_channels=channels))
    parallel = [op for op in dp.ops if op.fields.get("fixed_parallel")]
    geo = dp.geometry
    for op in dp.ops:
        assert op.cycles == isa.op_cycles(geo.rows, geo.cols, geo.lane, op.fields,
                                          geo.fixed_lanes, channels), op.name
    for op in parallel:
        assert op.kind == "conv"
        fields = {name: op.fields[f"fixed_{name}"] for name, _, _ in isa.FIXED_FIELDS}
        assert isa.parallel_ok(fields, channels), op.name
    if name.startswith("melius"):
        assert parallel            # the stem's convs
    assert all(b.cycles <= a.cycles for a, b in zip(one.ops, dp.ops))
    assert (sum(op.cycles for op in dp.ops) < sum(op.cycles for op in one.ops)) == bool(parallel)
    check_exact(program, dp, images_for(name, 0, count=2), fill=3)


@pytest.mark.parametrize("bits, parallel", [(17, 1), (18, 0), (20, 0)])
def test_parallel_conv_inputs_must_fit_18_bits(bits, parallel):
    """On a device of 24-bit elements a conv is parallel only if its input's values fit the
    extra channels' 18-bit multipliers (unsigned: 17 bits and the sign)."""
    program, images = single_op_program("conv", 0)
    conv = first_op(program, "conv")
    src = conv.inputs[0].tensor
    tensors = dict(program.tensors)
    tensors[src] = dataclasses.replace(tensors[src], bits=bits, signed=False)
    program = dataclasses.replace(program, tensors=tensors)
    dp = generate(program, config(fixed_channels=2, element_width=24))
    op = next(op for op in dp.ops if op.name == conv.name)
    assert op.fields["fixed_parallel"] == parallel
    check_exact(program, dp, torch.as_tensor(images))


def test_isa_model_refuses_a_parallel_op_that_breaks_the_rules():
    program = compiled("melius", 0)
    dp = generate(program, config(fixed_channels=4))
    image = images_for("melius", 0, count=1)[0].numpy()
    index = next(i for i, op in enumerate(dp.ops)
                 if op.opcode == isa.Opcode.FIXED and op.kind != "conv")
    with pytest.raises(ValueError, match="a parallel FIXED op must be a conv"):
        isa_model.run(with_fields(dp, index, fixed_parallel=1), image)
