"""The golden model against an independent implementation of the same integer semantics, and
against the float model."""

import pytest
import torch
import torch.nn.functional as F
from compile_nets import NETS, compile_net, normalize, raw_images

from sw.compile import golden
from sw.compile.quantize import integer_range


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- an independent, straightforward implementation ---------------------------------------------
# Binary tensors as +1/-1 float64, convolutions with F.conv2d in float64 (exact for these
# integers), rounding by floor division: none of it shares code with sw.compile.golden.

def _col(values):
    return torch.as_tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def _round_shift(v, shift):
    """floor((v + 2**(shift - 1)) / 2**shift) per channel, shift 0 leaving v."""
    shift = torch.as_tensor(shift, dtype=torch.float64).view(1, -1, 1, 1)
    half = torch.where(shift > 0, 2.0 ** (shift - 1), 0.0)
    return torch.floor((v + half) / 2.0 ** shift)


def _saturate(v, attrs):
    low, high = integer_range(attrs["bits"], attrs["relu"])
    return v.clamp(low, high)


def _reference_op(op, xs):
    p, a = op.params, op.attrs
    x = xs[0]
    if op.kind == "input":
        return x * 2.0 ** a["shift"] - _col(p["zero"])
    if op.kind == "conv":
        w = torch.as_tensor(p["weight"], dtype=torch.float64)
        acc = F.conv2d(x, w, stride=a["stride"], padding=a["padding"], groups=a["groups"])
        return _saturate(_round_shift(acc * _col(p["mul"]) + _col(p["bias"]), p["shift"]), a)
    if op.kind == "requant":
        return _saturate(_round_shift(x * _col(p["mul"]) + _col(p["bias"]), p["shift"]), a)
    if op.kind == "threshold":
        out = torch.empty_like(x)
        for c, (t, d) in enumerate(zip(p["threshold"].tolist(), p["direction"].tolist(),
                                       strict=True)):
            if d > 0:
                out[:, c] = (x[:, c] >= t).double()
            elif d < 0:
                out[:, c] = (x[:, c] <= t).double()
            else:
                out[:, c] = float(t)
        return out
    if op.kind == "bconv":
        k = a["kernel"]
        signs = torch.as_tensor(p["weight_bits"], dtype=torch.float64) * 2 - 1
        signs = signs.reshape(signs.shape[0], x.shape[1], k, k)
        pm = F.pad(x * 2 - 1, (a["padding"],) * 4, value=-1.0)
        dot = F.conv2d(pm, signs, stride=a["stride"])
        return (dot + signs[0].numel()) / 2
    if op.kind == "combine":
        m_bases, n_bases = a["M"], a["N"]
        out_c = xs[0].shape[1] // m_bases
        acc = torch.zeros_like(xs[0][:, :out_c])
        for n in range(n_bases):
            for m in range(m_bases):
                acc += float(p["coef"][n, m]) * xs[n][:, m * out_c:(m + 1) * out_c]
        v = acc * _col(p["mul"]) + _col(p["bias"])
        if a["residual"]:
            v = v + xs[-1] * _col(p["res_mul"])
        return _saturate(_round_shift(v, p["shift"]), a)
    if op.kind == "maxpool":
        return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"])
    if op.kind == "shuffle":
        c = x.shape[1]
        g = a["groups"]
        order = [(i % g) * (c // g) + i // g for i in range(c)]
        return x[:, order]
    if op.kind == "gap":
        return x.sum(dim=(2, 3), keepdim=True)
    raise AssertionError(f"unknown op {op.kind}")


def reference_run(program, raw):
    env = {name: torch.zeros((raw.shape[0], *t.shape), dtype=torch.float64)
           for name, t in program.tensors.items()}
    env[program.input] = raw.to(torch.float64)
    outputs = {}
    for op in program.ops:
        xs = [env[s.tensor][:, s.start:s.stop] for s in op.inputs]
        y = _reference_op(op, xs)
        o = op.output
        if op.mode == "add":
            env[o.tensor][:, o.start:o.stop] += y
        else:
            env[o.tensor][:, o.start:o.stop] = y
        outputs[op.name] = env[o.tensor][:, o.start:o.stop].clone()
    return env[program.logits].reshape(raw.shape[0], -1), outputs


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("net", list(NETS))
def test_golden_equals_reference(net, seed):
    _, artifact = compile_net(net, seed)
    raw = raw_images(seed + 3000, 16, NETS[net][1])
    logits, intermediates = golden.run(artifact, raw, return_intermediates=True)
    expected, expected_intermediates = reference_run(artifact.program, raw)
    assert list(intermediates) == [op.name for op in artifact.program.ops]
    for name, value in intermediates.items():
        want = expected_intermediates[name]
        assert value.dtype == torch.int64
        mismatch = (value.double() != want).nonzero()
        assert mismatch.numel() == 0, (
            f"{net} seed {seed}: op {name} differs at {mismatch[0].tolist()}: expected "
            f"{want[tuple(mismatch[0])].item()}, golden {value[tuple(mismatch[0])].item()}")
    assert torch.equal(logits.double(), expected)


@pytest.mark.parametrize("net", list(NETS))
def test_golden_tracks_float_model(net):
    # Untrained random networks with realistic BatchNorm statistics (those of their inputs):
    # many values sit near a sign's threshold, so small fixed-point errors flip bits, and the
    # logits vary little between images. Measured over 3 seeds x 128 images: top-1 agreement
    # 0.85-0.95 per network, mean logit error 0.09-0.2 of the logits' spread. A trained model
    # does far better (docs/compiler.md); the floors here catch a broken lowering (a wrong
    # scale or sign gives agreement near chance and errors above 1).
    agreements, errors = [], []
    for seed in range(3):
        model, artifact = compile_net(net, seed, calibration=128)
        raw = raw_images(seed + 4000, 128, NETS[net][1])
        with torch.no_grad():
            expected = model(normalize(raw)).double()
        logits = golden.run(artifact, raw).double()
        logits *= float(artifact.program.tensors["logits"].scale[0])
        agreements.append((logits.argmax(1) == expected.argmax(1)).double().mean().item())
        errors.append(((logits - expected).abs().mean() / expected.std()).item())
    agreement, error = sum(agreements) / 3, sum(errors) / 3
    assert agreement >= 0.75, f"{net}: golden/float top-1 agreement {agreement:.3f}"
    assert error <= 0.35, f"{net}: mean logit error {error:.3f} of the logits' spread"


def test_counts_of_blocks_are_exact():
    # The first binary conv's counts equal the float model's (both exact integers).
    model, artifact = compile_net("melius", 0)
    raw = raw_images(5, 8, 8)
    _, inter = golden.run(artifact, raw, return_intermediates=True)
    captured = {}
    block = model.blocks[0][0]
    handle = block.conv.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    act = block.act.register_forward_hook(lambda m, i, o: captured.setdefault("bits", o))
    with torch.no_grad():
        model(normalize(raw))
    handle.remove()
    act.remove()
    bits = inter["blocks.0.0.bn"].double() * 2 - 1
    agree = (bits == captured["bits"]).double().mean().item()
    assert agree > 0.97, f"thresholded bits agree with the float signs on {agree:.3f}"
    # Where every input bit agrees, the counts are equal.
    same = (bits == captured["bits"]).all()
    if same:
        assert torch.equal(inter["blocks.0.0.conv"].double(), captured["out"].double())


def test_rounding_rule_is_half_up():
    v = torch.tensor([-3, -2, -1, 1, 2, 3, 5], dtype=torch.int64).view(1, -1, 1, 1)
    y = golden.requantize(v, [1] * 7, relu=False, bits=8).flatten().tolist()
    assert y == [-1, -1, 0, 1, 1, 2, 3]


def test_saturation():
    v = torch.tensor([-1000, -5, 300], dtype=torch.int64).view(1, -1, 1, 1)
    assert golden.requantize(v, [0] * 3, relu=False, bits=8).flatten().tolist() == [-128, -5, 127]
    assert golden.requantize(v, [0] * 3, relu=True, bits=8).flatten().tolist() == [0, 0, 255]


def test_rejects_normalized_images():
    _, artifact = compile_net("melius", 0)
    with pytest.raises(ValueError, match="raw integer pixels"):
        golden.run(artifact, normalize(raw_images(0, 2, 8)))
    with pytest.raises(ValueError, match=r"images must be \(batch, 1, 8, 8\)"):
        golden.run(artifact, raw_images(0, 2, 9))
