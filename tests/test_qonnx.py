"""The QONNX front end (sw.compile.qonnx) against qonnx's own executor.

Small seeded Brevitas networks (tests/qonnx_nets.py: BNN-PYNQ's FC as TFC-W1A1 with small
widths, and CNV-W1A1's blocks at 12x12) are exported with ``brevitas.export.export_qonnx``,
compiled, and run on the golden model and with ``qonnx.core.onnx_exec.execute_onnx``: every
image's top-1 must agree and every binary activation tensor must equal the reference's
elementwise, except at ties (the reference's pre-activation exactly on the threshold). The
simulated device runs the same artifacts in tests/test_network_end_to_end.py.
"""

import numpy as np
import onnx
import pytest
import torch

from hw.board import get_board
from sw import data
from sw.compile import CompileError, golden
from sw.compile import __main__ as cli
from sw.compile.artifact import from_bytes, load, to_bytes
from sw.compile.qonnx import compare_with_reference, compile_onnx, raw_to_input
from tests.qonnx_nets import export, quiet, tiny_cnv, tiny_fc

CONFIG = get_board("ulx3s", None).default_config


@pytest.fixture(scope="module")
def fc_model(tmp_path_factory):
    return export(tiny_fc(0), (1, 28, 28), tmp_path_factory.mktemp("qonnx") / "fc.onnx")


@pytest.fixture(scope="module")
def cnv_model(tmp_path_factory):
    return export(tiny_cnv(0), (1, 12, 12), tmp_path_factory.mktemp("qonnx") / "cnv.onnx")


def mnist_raw(count):
    return data.load_dataset("mnist5k", "test").raw[:count].numpy()


def check_agreement(report, images):
    assert report["images"] == images
    assert report["top1_agreements"] == images, (
        report["predictions"], report["reference_predictions"])
    assert report["bits_compared"] > 0
    # Every binary tensor equal, except where the reference sits exactly on a threshold.
    assert report["bit_mismatches"] == report["mismatches_at_ties"], report["activations"]


def test_fc_agrees_with_qonnx(fc_model):
    artifact = compile_onnx(fc_model, CONFIG)
    kinds = [op.kind for op in artifact.program.ops]
    assert kinds == ["threshold", "bconv", "threshold", "bconv", "threshold", "bconv"]
    # The input is binarized on the raw pixels: sign(2 * p / 255 - 1) = +1 from p = 128 on.
    first = artifact.program.ops[0]
    assert first.params["threshold"].tolist() == [128] * 784
    assert first.params["direction"].tolist() == [1] * 784
    assert artifact.program.tensors[artifact.program.input].shape == (784, 1, 1)
    # Random gammas below zero compare downwards; TensorNorm's negative weight reversed the
    # logits, so the last layer's weights were negated and the logits' scale is positive.
    assert any((op.params["direction"] == -1).any() for op in artifact.program.ops[2::2])
    assert artifact.preprocessing["qonnx"]["logits"]["scale"] > 0
    raw = mnist_raw(100)
    report = compare_with_reference(artifact, fc_model, raw)
    check_agreement(report, 100)
    assert report["bits_compared"] == 100 * (784 + 32 + 24)
    # The artifact file round trip keeps every integer.
    again = from_bytes(to_bytes(artifact))
    images = torch.as_tensor(raw_to_input(artifact, raw))
    assert torch.equal(golden.run(again, images), golden.run(artifact, images))


def test_cnv_blocks_agree_with_qonnx(cnv_model):
    artifact = compile_onnx(cnv_model, CONFIG)
    ops = {op.name: op for op in artifact.program.ops}
    assert [op.kind for op in artifact.program.ops][:4] == ["requant", "conv", "maxpool",
                                                          "threshold"]
    bconvs = [op for op in artifact.program.ops if op.kind == "bconv"]
    # The Pad of -1 became the binary conv's padding; the flattened 3x3 map a 3x3 kernel.
    assert [(op.attrs["kernel"], op.attrs["padding"]) for op in bconvs] == [
        (3, 1), (3, 0), (3, 0), (1, 0)]
    assert (ops["node_Conv_127"].params["weight"] != 0).all()
    raw = np.random.default_rng(5).integers(0, 256, (64, 1, 12, 12))
    check_agreement(compare_with_reference(artifact, cnv_model, raw), 64)


def test_input_codes_equal_the_quantizer(cnv_model):
    """The requantization of the raw pixels gives Brevitas' 8-bit input codes for every pixel
    value (round half to even of (2 p / 255 - 1) * 128, clipped to [-128, 127])."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    artifact = compile_onnx(cnv_model, CONFIG)
    first = artifact.program.ops[0]
    assert first.kind == "requant"
    pixels = np.arange(256 + 32) % 256
    raw = pixels.reshape(2, 1, 12, 12)
    _, steps = golden.run(artifact, torch.as_tensor(raw), return_intermediates=True)
    wrapper = ModelWrapper(str(cnv_model))
    scale = artifact.preprocessing["qonnx"]["input_quant"]["scale"]
    quant = next(n for n in wrapper.graph.node if n.op_type == "Quant").output[0]
    for i in range(2):
        context = execute_onnx(wrapper, {wrapper.graph.input[0].name:
                                         raw[i:i + 1].astype(np.float32) / np.float32(255)},
                               return_full_exec_context=True)
        codes = context[quant] / scale
        assert np.array_equal(steps[first.name][i].numpy(), codes[0].astype(np.int64))
    expected = np.clip(np.round((2 * np.arange(256) / 255 - 1) * 128), -128, 127)
    assert sorted(set(zip(pixels, steps[first.name].numpy().reshape(-1)))) == list(
        zip(range(256), expected.astype(int)))


def test_command_line_compiles_an_onnx_file(fc_model, tmp_path, capsys):
    out = tmp_path / "fc.bnn"
    assert cli.main([str(fc_model), "--board", "ulx3s", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{fc_model} -> {out}" in printed and "node_linear_2" in printed
    artifact = load(out, CONFIG)
    raw = mnist_raw(8)
    expected = golden.run(compile_onnx(fc_model, CONFIG), torch.as_tensor(
        raw_to_input(artifact, raw)))
    assert torch.equal(golden.run(artifact, torch.as_tensor(raw_to_input(artifact, raw))),
                       expected)


def test_models_after_qonnx_cleanup_compile_alike(fc_model, cnv_model, tmp_path):
    """qonnx's cleanup (constant folding, shape inference, renaming; what a FINN flow runs
    first) gives a graph that compiles to the same integers."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model
    for path, raw in ((fc_model, mnist_raw(16)),
                      (cnv_model, np.random.default_rng(6).integers(0, 256, (16, 1, 12, 12)))):
        with quiet():
            cleaned = cleanup_model(ModelWrapper(str(path)))
        cleaned.save(str(tmp_path / "clean.onnx"))
        original = compile_onnx(path, CONFIG)
        again = compile_onnx(tmp_path / "clean.onnx", CONFIG)
        images = torch.as_tensor(raw_to_input(original, raw))
        assert torch.equal(golden.run(again, images), golden.run(original, images))
        check_agreement(compare_with_reference(again, tmp_path / "clean.onnx", raw[:4]), 4)


def test_run_inference_takes_images_for_a_flattening_network(fc_model):
    from sw.inference import run_inference
    artifact = compile_onnx(fc_model, CONFIG)
    raw = mnist_raw(3)
    expected = golden.run(artifact, torch.as_tensor(raw_to_input(artifact, raw))).numpy()
    predictions = run_inference(raw, artifact)
    assert [p.index for p in predictions] == expected.argmax(axis=1).tolist()
    assert np.array_equal(run_inference(raw[0, 0], artifact).logits, expected[0])


def test_unmappable_nodes_are_named(tmp_path, cnv_model):
    padded = export(tiny_cnv(1, conv_padding=1), (1, 12, 12), tmp_path / "padded.onnx")
    with pytest.raises(CompileError, match=r"node '\w+' \(Conv\): an ONNX Conv pads with 0"):
        compile_onnx(padded, CONFIG)
    two_bit = export(tiny_fc(2, widths=(16,), act_bit_width=2), (1, 28, 28),
                     tmp_path / "w1a2.onnx")
    with pytest.raises(CompileError, match=r"node '\w+' \(Quant\): a 2-bit Quant of "
                                           r"activations after the input"):
        compile_onnx(two_bit, CONFIG)
    model = onnx.load(str(cnv_model))
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    pool.op_type = "AveragePool"
    with pytest.raises(CompileError, match=rf"node '{pool.name}' \(AveragePool\): this op type "
                                           r"is not supported"):
        compile_onnx(model, CONFIG)


def test_a_program_too_large_for_the_board_is_refused(fc_model):
    small = CONFIG.replace(max_depth=512)
    with pytest.raises(CompileError, match="node_linear: a dot product of 784 bits"):
        compile_onnx(fc_model, small)


@pytest.mark.parametrize("signed,narrow,bit_width,scale", [
    (1, 0, 8, 2.0 ** -7), (1, 1, 8, 2.0 ** -7), (0, 0, 8, 1 / 255), (1, 0, 4, 0.13),
    (0, 1, 6, 0.0171)])
def test_input_quantizers_become_a_requantization(signed, narrow, bit_width, scale):
    """Quantizers of the pixel values (``2 p / 255 - 1`` for signed ones, ``p / 255`` for
    unsigned) map to an integer requantization of the raw pixel equal on every pixel value,
    except a signed narrow-range one whose clip at -127 (pixels 0 and 1 both give -127) no
    saturation of the device (at -128) reproduces: none is found, and the compiler refuses."""
    from sw.compile.qonnx import _fit_codes, _int_quant
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    if signed:
        x = x * np.float32(2) - np.float32(1)
    codes, _ = _int_quant(x, np.float32(scale), np.float32(0), bit_width, signed, narrow,
                          "ROUND")
    found = _fit_codes(codes.astype(np.int64), bit_width, int(not signed))
    if signed and narrow:
        assert found is None and codes[0] == codes[1] == -127
        return
    mul, bias, shift = found
    v = torch.arange(256).view(1, -1, 1, 1) * mul + bias
    y = golden.requantize(v, np.array([shift]), int(not signed), bit_width).view(-1)
    assert y.tolist() == codes.astype(int).tolist()
