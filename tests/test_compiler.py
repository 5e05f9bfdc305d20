"""The compiler: fixed-point formats, lowering, the memory plan, validation and the CLI."""

import numpy as np
import pytest
import torch
from compile_nets import CLASS_NAMES, CONFIG, PREPROCESSING, compile_net, normalize, raw_images

from hw.board import get_board
from sw import data, train
from sw.compile import CompileError, compile_model, golden, load
from sw.compile import quantize as q
from sw.compile.__main__ import main
from sw.compile.plan import lifetimes, plan_memory
from sw.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- fixed-point formats -------------------------------------------------------------------------

def test_thresholds_equal_batchnorm_then_sign():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(size=30), [0.0, 0.0]])
    b = np.concatenate([rng.normal(size=30) * 20, [0.5, -0.5]])
    scale = rng.uniform(0.1, 2, size=32)
    threshold, direction = q.thresholds(a, b, scale)
    x = np.arange(-100, 101)[:, None]
    expected = a * scale * x + b >= 0
    got = np.where(direction > 0, x >= threshold, np.where(direction < 0, x <= threshold,
                                                           threshold.astype(bool)))
    assert np.array_equal(got, expected)
    assert direction[-2:].tolist() == [0, 0] and threshold[-2:].tolist() == [1, 0]


def test_requant_params_approximate_the_real_multiplier():
    mul = np.array([1e-6, 3e-3, 0.7, 5.0, -2.5, 0.0])
    bias = np.array([0.3, -7.0, 2.0, 0.0, 1.5, 4.0])
    p = q.requant_params(mul, bias)
    assert np.all(np.abs(p["mul"]) < 1 << (q.MUL_BITS - 1))
    approx = p["mul"] / 2.0 ** p["shift"]
    big = np.abs(mul) > 1e-4
    assert np.allclose(approx[big], mul[big], rtol=2 ** -13)
    assert np.allclose(p["bias"] / 2.0 ** p["shift"], bias, atol=2.0 ** -p["shift"])


def test_quantize_weights_per_output_channel():
    w = np.array([[1.0, -0.5, 0.25], [0.01, 0.02, -0.04]])
    qw, scale = q.quantize_weights(w)
    assert qw.dtype == np.int8
    # -63.5 rounds half up to -63.
    assert qw.tolist() == [[127, -63, 32], [32, 64, -127]]
    assert np.allclose(qw * scale[:, None], w, atol=scale.max() / 2)


def test_round_half_up():
    assert q.round_half_up([-1.5, -0.5, 0.5, 1.5, 2.4]).tolist() == [-1, 0, 1, 2, 2]


# -- lowering ------------------------------------------------------------------------------------

def test_meliusnet_program_concatenates_and_adds_into_slices():
    _, artifact = compile_net("melius", 0)
    ops = {op.name: op for op in artifact.program.ops}
    dense, improve = ops["blocks.0.0.conv"], ops["blocks.0.1.conv"]
    assert (dense.kind, dense.mode, dense.output.start, dense.output.stop) == (
        "bconv", "write", 16, 32)
    assert (improve.kind, improve.mode, improve.output.start, improve.output.stop) == (
        "bconv", "add", 16, 32)
    assert ops["blocks.0.1.bn"].inputs[0].stop == 32
    stage = artifact.program.tensors[dense.output.tensor]
    assert np.all(stage.scale[16:32] == 1.0)


def test_input_normalization_is_folded():
    _, artifact = compile_net("melius", 0)
    raw = raw_images(1, 4, 8)
    _, inter = golden.run(artifact, raw, return_intermediates=True)
    scale = artifact.program.tensors["input"].scale[0]
    assert torch.allclose(inter["input"].double() * scale, normalize(raw).double(),
                          atol=1 / 32 / PREPROCESSING["std"][0])


def test_full_precision_blocks_are_rejected():
    model = build_model("fp-small", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(CompileError, match=r"blocks\.0\.0: only binary blocks"):
        compile_model(model, CONFIG, calibration=normalize(raw_images(0, 4, 8)),
                      preprocessing=PREPROCESSING, class_names=CLASS_NAMES)


def test_unknown_model_is_rejected():
    with pytest.raises(CompileError, match="cannot compile a Sequential"):
        compile_model(torch.nn.Sequential(), CONFIG, calibration=normalize(raw_images(0, 4, 8)),
                      preprocessing=PREPROCESSING, class_names=CLASS_NAMES)


# -- memory plan and validation --------------------------------------------------------------------

@pytest.mark.parametrize("net", ["melius", "abc"])
def test_memory_plan_never_overlaps_live_tensors(net):
    _, artifact = compile_net(net, 0)
    program = artifact.program
    offsets, total = plan_memory(program)
    life = lifetimes(program)
    names = list(offsets)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            if life[x][1] < life[y][0] or life[y][1] < life[x][0]:
                continue
            (ox, sx), (oy, sy) = offsets[x], offsets[y]
            assert ox + sx <= oy or oy + sy <= ox, f"{x} and {y} overlap while both live"
    assert total < sum(size for _, size in offsets.values()), "no buffer was reused"
    assert total == artifact.hardware["activation_bytes"]


def test_dot_product_too_long_names_the_layer():
    with pytest.raises(CompileError, match=r"blocks\.0\.0\.conv: a dot product of 144 bits "
                                           r"exceeds the array's max_depth of 128 bits"):
        compile_net("melius", 0, config=CONFIG.replace(max_depth=128))


def test_activation_memory_overflow_names_the_layer():
    with pytest.raises(CompileError, match=r"^[\w.]+: tensor '[\w.]+' .*INTS"):
        compile_net("melius", 0, config=CONFIG.replace(int_depth=512))


def test_weight_memory_overflow_names_the_layer():
    with pytest.raises(CompileError, match=r"^blocks\.0\.0\.conv: its \d+ WEIGHTS words do not "
                                           r"fit the WEIGHTS memory \(4 words\)"):
        compile_net("melius", 0, config=CONFIG.replace(weight_depth=4))
    # Less than one output channel's coefficients: the conv cannot be split to fit.
    with pytest.raises(CompileError, match=r"^stem\.conv\d: its \d+ COEFS words do not fit the "
                                           r"COEFS memory \(8 words\)"):
        compile_net("melius", 0, config=CONFIG.replace(coef_depth=8))


# -- command line --------------------------------------------------------------------------------

def test_command_line(tmp_path, capsys):
    info = data.load_dataset("digits", "test").info
    torch.manual_seed(0)
    model = build_model("meliusnet-small", num_classes=10, in_channels=1, input_size=8)
    checkpoint = {
        "format": train.CHECKPOINT_FORMAT, "version": train.CHECKPOINT_VERSION,
        "model": {"name": "meliusnet-small", "options": {}, "num_classes": 10,
                  "in_channels": 1, "input_size": 8},
        "model_state": model.state_dict(),
        "dataset": {"name": "digits", "class_names": list(info.class_names),
                    "in_channels": 1, "input_size": 8, **info.normalization()},
    }
    torch.save(checkpoint, tmp_path / "best.pt")
    output = tmp_path / "model.bnn"
    assert main([str(tmp_path / "best.pt"), "--board", "ulx3s", "-o", str(output),
                 "--calibration", "64"]) == 0
    report = capsys.readouterr().out
    for text in ("stem.conv1", "blocks.0.0.conv", "bconv", "head.fc", "total",
                 "device memories", "cycles", "ms per image"):
        assert text in report
    artifact = load(output, get_board("ulx3s").default_config)
    assert artifact.class_names == list(info.class_names)
    assert artifact.preprocessing["mean"] == list(info.mean)


def test_command_line_reports_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.bnn")]) == 1
    assert "does not exist" in capsys.readouterr().err
