"""Single ops and whole networks on the simulated device, through the host driver over
``socket://``.

``python -m sim.board`` (:class:`sim.board.BoardProcess`) simulates :class:`hw.device.Device`
under Verilator with its UART on a TCP port. :class:`sw.runtime.Accelerator` loads compiled
programs into it (descriptors, weights, parameters) and runs images; every image's logits must
equal the golden model's (:func:`sw.compile.golden.run`) exactly. The networks: a MeliusNet and
an ABC-Net trained briefly on scikit-learn's digits, and seeded random networks that together
use every op kind (grouped and strided convs, pooling with padding, channel shuffle, ABC-Net
combinations with residuals, ImprovementBlock adds). One program runs with weight streaming
(its weights split into several segments).

The device's per-op cycle counters are checked: they sum to the run's total and each equals
the timing model of :func:`sw.isa.op_cycles` (the units' exact formulas plus the sequencer's
cycles).
"""

import types

import numpy as np
import pytest
import torch

from hw.config import DeviceConfig
from sw import data, train
from sw.compile import golden
from sw.compile.codegen import generate
from sw.protocol import Memory
from sw.runtime import Accelerator
from tests import boards
from tests.compile_nets import compile_net, raw_images
from tests.device_programs import KINDS, cnv_like_program, fused_program, single_op_program

#: A 4x4x32 array with eight fixed-point lanes (INTS banks: twice the columns, as in the
#: ULX3S-85F default) computing four output channels at once in parallel convs (the default
#: computes two), memories that hold the test networks, 4 clock cycles per UART bit (the
#: fastest the UART allows: loading weights costs fewer simulated cycles). ``max_depth`` 4096
#: gives the ULX3S default's 13-bit counts, which a 3-channel 3x3 bit-plane conv needs (up to
#: 255 * 27 = 6,885).
#: A short byte timeout (2 ms, 48,000 cycles) answers truncated frames quickly (the fuzz test).
CONFIG = DeviceConfig(rows=4, cols=4, lane=32, max_depth=4096, weight_depth=640,
                      activation_depth=16, result_depth=16, max_payload=256,
                      clock_hz=24_000_000, baud=6_000_000, byte_timeout_us=2000,
                      int_depth=12288, bits_depth=512, coef_depth=6144, param_depth=1024,
                      program_depth=128, fixed_lanes=8, fixed_channels=4)
REPLY_TIMEOUT = 10.0
BOARD_LIMITS = {"idle_timeout": 120, "time_limit": 1200, "startup_timeout": 600}


@pytest.fixture(scope="module")
def board():
    yield from boards.serving(CONFIG, BOARD_LIMITS)


def open_device(board):
    return boards.open_device(board, REPLY_TIMEOUT)


def check_network(board, artifact, images, config=CONFIG):
    program = artifact.program
    expected = golden.run(program, torch.as_tensor(images)).numpy()
    with open_device(board) as device:
        accelerator = Accelerator(device, program)
        dp = accelerator.device_program
        for index, image in enumerate(images):
            result = accelerator.infer(image)
            assert np.array_equal(result.logits, expected[index]), (
                f"image {index}: device logits {result.logits.tolist()} != golden "
                f"{expected[index].tolist()}")
            assert len(result.op_cycles) == len(dp.ops)
            if len(dp.segments) == 1:
                assert sum(result.op_cycles) == result.cycles
            # Every op's counter is its predicted timing (sw.isa.op_cycles), exactly.
            assert result.op_cycles == [op.cycles for op in dp.ops], [
                (op.name, got, op.cycles) for op, got in zip(dp.ops, result.op_cycles)
                if got != op.cycles]
    return dp


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_single_ops_are_bit_exact(board, kind, seed):
    """Each op kind with a seeded random shape and random parameters (tests/device_programs):
    odd map sizes, channels not a multiple of the lane or the array, strides, paddings, groups,
    saturation, the three threshold directions, residual combinations, write-then-add."""
    program, images = single_op_program(kind, seed)
    check_network(board, types.SimpleNamespace(program=program), images)


@pytest.mark.parametrize("name,seed", [("melius", 0), ("melius-pool-shuffle", 1),
                                       ("abc", 0), ("abc-pool", 2), ("plain", 3)])
def test_random_networks_are_bit_exact(board, name, seed):
    _, artifact = compile_net(name, seed, config=CONFIG)
    size = artifact.program.tensors[artifact.program.input].shape[-1]
    dp = check_network(board, artifact, raw_images(seed + 3000, 2, size).numpy())
    if name.startswith("melius"):
        # The stem's convs compute four output channels at once (sw.isa.parallel_ok).
        assert any(op.fields.get("fixed_parallel") for op in dp.ops), [op.name for op in dp.ops]


@pytest.mark.parametrize("name", ["fc", "cnv"])
def test_qonnx_networks_are_bit_exact(board, tmp_path, name):
    """Brevitas networks exported to QONNX (tests/qonnx_nets.py; checked against qonnx's
    executor in tests/test_qonnx.py): BNN-PYNQ's FC with small widths at 12x12 (a 144-channel
    binarized input; smaller than MNIST's 784 so that loading its parameters is quick), and
    CNV-W1A1's blocks (8-bit input codes, a fixed-point conv, max pools of negated counts, -1
    padding, a 3x3 kernel on a flattened map)."""
    from sw.compile.qonnx import compile_onnx, raw_to_input
    from tests.qonnx_nets import export, tiny_cnv, tiny_fc
    if name == "fc":
        path = export(tiny_fc(3, size=12), (1, 12, 12), tmp_path / "fc.onnx")
    else:
        path = export(tiny_cnv(3), (1, 12, 12), tmp_path / "cnv.onnx")
    raw = np.random.default_rng(9).integers(0, 256, (2, 1, 12, 12))
    artifact = compile_onnx(path, CONFIG)
    check_network(board, artifact, raw_to_input(artifact, raw))


def test_weight_streaming_is_bit_exact(board):
    # Small WEIGHTS/COEFS/PARAMS budgets in the generator split the program into segments
    # that the host loads one after the other (the device's memories are larger).
    _, artifact = compile_net("abc", 4, config=CONFIG)
    small = CONFIG.replace(weight_depth=80, coef_depth=256, param_depth=64)
    assert len(generate(artifact.program, small).segments) > 1
    images = raw_images(77, 3, 8).numpy()
    expected = golden.run(artifact.program, torch.as_tensor(images)).numpy()
    with open_device(board) as device:
        accelerator = Accelerator(device, artifact.program, budget=small)
        dp = accelerator.device_program
        assert len(dp.segments) > 1
        # Some segment needs tensors from before it: a batch must carry them.
        assert any(accelerator.carried[1:])
        predicted = [op.cycles for op in dp.ops]

        def loads():
            return [device.writes[memory] for memory in (Memory.WEIGHTS, Memory.COEFS,
                                                         Memory.PARAMS)]

        before, sent = loads(), device.bytes_sent
        result = accelerator.infer(images[0])
        one_load = [after - first for after, first in zip(loads(), before)]
        one_image = device.bytes_sent - sent
        assert np.array_equal(result.logits, expected[0])
        assert result.op_cycles == predicted and result.cycles == sum(predicted)

        # A batch: every image's answer as infer's, each segment's data written once for all.
        before, sent = loads(), device.bytes_sent
        results = accelerator.infer_batch(images)
        assert [after - first for after, first in zip(loads(), before)] == one_load
        assert device.bytes_sent - sent < len(images) * one_image
        for index, result in enumerate(results):
            assert np.array_equal(result.logits, expected[index]), (
                f"image {index} of the batch: device logits {result.logits.tolist()} != "
                f"golden {expected[index].tolist()}")
            assert result.op_cycles == predicted and result.cycles == sum(predicted)
        assert accelerator.infer_batch([]) == []
        with pytest.raises(ValueError, match="shape"):
            accelerator.infer_batch([images[0], images[0][:, :4]])


@pytest.mark.parametrize("kind", ["threshold-bconv", "bconv-add"])
def test_ops_split_to_fit_the_weight_memory_are_bit_exact(board, kind):
    """With WEIGHTS a little larger than one row tile, a binary conv (written, or added into
    its output) runs as pieces of whole row tiles (sw.compile.split), streamed segment by
    segment; the logits equal golden's and every counter its timing model."""
    program, images = single_op_program(kind, 3)
    full = generate(program, CONFIG)
    k_words = max(op.fields.get("bconv_k_words", 0) for op in full.ops)
    small = CONFIG.replace(weight_depth=k_words + 1)
    expected = golden.run(program, torch.as_tensor(images)).numpy()
    with open_device(board) as device:
        accelerator = Accelerator(device, program, budget=small)
        dp = accelerator.device_program
        assert dp.split and len(dp.segments) > 1
        predicted = [op.cycles for op in dp.ops]
        for index, image in enumerate(images):
            result = accelerator.infer(image)
            assert np.array_equal(result.logits, expected[index])
            assert result.op_cycles == predicted


def test_counts_too_big_for_ints_run_piece_by_piece_on_the_device(board):
    """A binary conv's counts and the max pool reading them (CNV's pattern) run piece by piece
    through a tensor of half the channels when INTS is a little too small for the whole
    program (sw.compile.split.split_activation); logits and counters exact. (A second reader
    of the pooled counts keeps conv2 from running straight to bits.)"""
    program, images = cnv_like_program(61, weights="int8", pool_readers=2)
    full = generate(program, CONFIG)
    # The INTS depth must be a multiple of the banks (8).
    small = CONFIG.replace(int_depth=(full.ints_used - 1) // 8 * 8)
    expected = golden.run(program, torch.as_tensor(images)).numpy()
    with open_device(board) as device:
        accelerator = Accelerator(device, program, budget=small)
        dp = accelerator.device_program
        assert set(dp.split) == {"conv2", "conv2.pool"}
        for index, image in enumerate(images):
            result = accelerator.infer(image)
            assert np.array_equal(result.logits, expected[index])
            assert result.op_cycles == [op.cycles for op in dp.ops]


def test_cnv_shaped_network_with_a_bit_plane_first_layer(board):
    """CNV-W1A1 in miniature (tests/device_programs.cnv_like_program, here with padding and
    stride 2): 8-bit pixels, a 3x3 conv with +-1 weights as bit-planes on the array,
    thresholds, binary convs, a max pool and a fully connected layer; every conv but the
    logits' runs straight to bits (the thresholds and the pool fused into it). The image goes to BITS
    as bit-planes; every image's logits and the first layer's bits (read back after running
    only the first three ops) equal golden's, and every counter equals the timing model."""
    program, images = cnv_like_program(21, pad=1, stride=2)
    expected, steps = golden.run(program, torch.as_tensor(images), return_intermediates=True)
    with open_device(board) as device:
        accelerator = Accelerator(device, program)
        dp = accelerator.device_program
        assert dp.bitplanes == "conv1" and dp.input_memory == "BITS"
        # conv1, conv2 (with its pool) and conv3 run straight to bits.
        assert dp.fused == {"conv1": ("conv1.act", None), "conv2": ("conv2.act", "conv2.pool"),
                            "conv3": ("conv3.act", None)}
        for index, image in enumerate(images):
            result = accelerator.infer(image)
            assert np.array_equal(result.logits, expected[index].numpy())
            assert result.op_cycles == [op.cycles for op in dp.ops]
        first = [op.name for op in dp.ops].index("conv1.act") + 1
        c, h, w = program.tensors["conv1.act"].shape
        _, base, size = dp.allocation["conv1.act"]
        estimate = sum(op.cycles for op in dp.ops[:first])
        for index in (0, 3):        # random pixels; all 255
            device.write_words(Memory.BITS, dp.input_base, dp.input_words(images[index]))
            assert device.run_ops(0, first, estimated_cycles=estimate,
                                  max_cycles=2 * estimate) == estimate
            words = device.read_words(Memory.BITS, base, size)
            bits = np.array([[(word >> i) & 1 for i in range(c)] for word in words])
            assert np.array_equal(bits.T.reshape(c, h, w), steps["conv1.act"][index].numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_convs_straight_to_bits(board, seed):
    """Random chains of bconv -> [2x2 max pool] -> threshold (tests/device_programs.
    fused_program: odd maps pooled with floor, strides, padding, channels not multiples of the
    rows or the lane, m_tiles > 1, all three threshold directions) run as BCONVs straight to
    bits: logits equal golden's, every counter equals the timing model (a fused BCONV's
    drain, the NOPs of the fused threshold and pool)."""
    program, images = fused_program(seed)
    dp = generate(program, CONFIG)
    assert dp.fused and any(pool for _, pool in dp.fused.values())
    check_network(board, types.SimpleNamespace(program=program), images)


def test_a_fixed_point_conv_writes_its_thresholds_bits(board):
    """CNV's first layer with int8 weights (so not as bit-planes) and padding: the
    fixed-point conv compares its accumulators with the rewritten thresholds and writes the
    bits itself (sw.compile.codegen._plan_conv_to_bits); every image's logits equal golden's
    and every counter (the threshold op's a NOP) equals the timing model."""
    program, images = cnv_like_program(22, weights="int8", pad=1)
    dp = check_network(board, types.SimpleNamespace(program=program), images)
    assert dp.convs_to_bits == ("conv1",) and "conv1" not in dp.allocation


@pytest.fixture(scope="module")
def digits_artifacts(tmp_path_factory):
    """A MeliusNet and an ABC-Net (smaller than the registry's defaults, so that the
    simulation loads them quickly) trained on digits for ten epochs, compiled; with their
    test accuracies (float model) for the record."""
    from sw.compile.compiler import compile_checkpoint
    torch.set_num_threads(1)
    artifacts = {}
    for model, options in (
            ("meliusnet-small", {"blocks": (2, 2), "transition_channels": (48,),
                                 "init_features": 32, "growth_rate": 16}),
            ("abcnet-small", {"blocks": (1, 1), "widths": (16, 32), "M": 2, "N": 2})):
        out = tmp_path_factory.mktemp(model)
        config = train.TrainConfig(model=model, dataset="digits", epochs=10, batch_size=64,
                                   seed=0, output=str(out), model_options=options,
                                   threads=1, progress=False)
        metrics = train.train(config)
        artifact, _ = compile_checkpoint(out / "best.pt", CONFIG, calibration_images=256)
        artifacts[model] = artifact
        test = data.load_dataset("digits", "test")
        golden_accuracy = (golden.run(artifact, test.raw).argmax(1) == test.labels).double()
        print(f"{model} on digits: test accuracy of the compiled checkpoint: float "
              f"{100 * metrics['best_accuracy']:.2f}%, golden "
              f"{100 * golden_accuracy.mean().item():.2f}%")
    return artifacts


@pytest.mark.parametrize("model", ["meliusnet-small", "abcnet-small"])
def test_trained_digits_networks_are_bit_exact(board, digits_artifacts, model):
    artifact = digits_artifacts[model]
    test = data.load_dataset("digits", "test")
    images = test.raw[:6].numpy()
    check_network(board, artifact, images)


def test_a_runaway_program_is_aborted_and_the_device_recovers(board):
    """A descriptor that would run for about 7 * 10**10 cycles: its RUN is aborted at the
    cycle limit (no hang, no power cycle), and the loaded network still runs bit-exactly."""
    from sw import isa
    from sw.driver import DeviceError
    from sw.protocol import Memory, Status
    _, artifact = compile_net("melius", 6, config=CONFIG)
    images = raw_images(66, 1, 8).numpy()
    expected = golden.run(artifact.program, torch.as_tensor(images)).numpy()
    runaway = isa.DESCRIPTOR.pack(
        opcode=isa.Opcode.FIXED, fixed_in_h=1, fixed_in_w=1, fixed_kernel_h=1,
        fixed_kernel_w=1, fixed_stride=1, fixed_terms_c=1, fixed_out_channels=4095,
        fixed_out_h=4095, fixed_out_w=4095, fixed_out_plane=4095 * 4095 % (1 << 24))
    last = CONFIG.program_depth - 1
    with open_device(board) as device:
        accelerator = Accelerator(device, artifact.program)
        device.write_words(Memory.PROGRAM, last, [runaway])
        with pytest.raises(DeviceError) as error:
            device.run_ops(last, 1, estimated_cycles=5000, max_cycles=5000)
        assert error.value.status == Status.ABORTED
        assert "exceeded its cycle limit" in str(error.value)
        device.ping(b"still here")
        assert np.array_equal(accelerator.infer(images[0]).logits, expected[0])


def test_gemm_and_networks_share_the_array(board):
    """The GEMM engine and the binary conv engine take turns on one XNOR array: GEMMs between
    inferences, and after a binary conv aborted with its tiles in flight, are exact, and so is
    the network after them (a GEMM overwrites WEIGHTS: the accelerator sees the device's write
    counts change and loads its weights again)."""
    from sw import isa
    from sw.driver import DeviceError
    from sw.protocol import Memory, Status
    _, artifact = compile_net("melius", 6, config=CONFIG)
    images = raw_images(67, 2, 8).numpy()
    expected = golden.run(artifact.program, torch.as_tensor(images)).numpy()
    generator = torch.Generator().manual_seed(5)

    def check_gemm(device, M, N, K):
        W = torch.randint(0, 2, (M, K), generator=generator) * 2 - 1
        A = torch.randint(0, 2, (K, N), generator=generator) * 2 - 1
        counts, _ = device.gemm(W, A)
        assert np.array_equal(np.asarray(counts), ((W @ A + K) // 2).numpy())

    # About 1024 row tiles of 64 pixels of 9 words: far beyond the cycle limit below.
    runaway = isa.DESCRIPTOR.pack(
        opcode=isa.Opcode.BCONV, bconv_in_h=16, bconv_in_w=16, bconv_channels=32,
        bconv_channel_words=1, bconv_kernel=3, bconv_stride=1, bconv_pad=1,
        bconv_k_words=9, bconv_m_tiles=1024, bconv_out_channels=4095, bconv_out_plane=256)
    last = CONFIG.program_depth - 1
    with open_device(board) as device:
        accelerator = Accelerator(device, artifact.program)
        check_gemm(device, 7, 5, 70)
        assert np.array_equal(accelerator.infer(images[0]).logits, expected[0])
        check_gemm(device, 4, 4, 32)
        device.write_words(Memory.PROGRAM, last, [runaway])
        with pytest.raises(DeviceError) as error:
            device.run_ops(last, 1, estimated_cycles=3000, max_cycles=3000)
        assert error.value.status == Status.ABORTED
        check_gemm(device, 8, 4, 100)
        assert np.array_equal(accelerator.infer(images[1]).logits, expected[1])


def test_images_travel_as_bytes_and_requests_are_pipelined(board):
    """An image whose pixels fit 0 .. 255 is written with WRITE8 (one byte per pixel instead
    of ``element_width / 8``), one with a larger pixel with WRITE; both bit-exact. A batch is
    pipelined within the device's receive buffer and gives each image's own answer."""
    _, artifact = compile_net("melius", 0, config=CONFIG)
    images = raw_images(3000, 2, 8).numpy()
    wide = images[:1].copy()
    wide[0, 0, 0, 0] = 300                  # beyond a byte: the 24-bit WRITE path
    expected = golden.run(artifact.program, torch.as_tensor(np.concatenate([images, wide])))
    with open_device(board) as device:
        accelerator = Accelerator(device, artifact.program)
        pixels = images[0].size

        def one(image):
            sent, received = device.bytes_sent, device.bytes_received
            result = accelerator.infer(image)
            return result, device.bytes_sent - sent, device.bytes_received - received

        narrow, narrow_sent, narrow_received = one(images[0])
        wide_result, wide_sent, wide_received = one(wide[0])
        assert np.array_equal(narrow.logits, expected[0].numpy())
        assert np.array_equal(wide_result.logits, expected[2].numpy())
        element = CONFIG.word_bytes(Memory.INTS)
        assert wide_sent - narrow_sent == (element - 1) * pixels   # one frame each (64 B)
        assert wide_received == narrow_received
        print(f"link bytes per {images[0].shape} image: WRITE8 {narrow_sent} sent + "
              f"{narrow_received} received, 24-bit WRITE {wide_sent} + {wide_received}")
        results = accelerator.infer_batch(images)
        for index, result in enumerate(results):
            assert np.array_equal(result.logits, expected[index].numpy())
            assert result.op_cycles == narrow.op_cycles
