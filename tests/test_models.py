"""Tests of sw.models: the binary numeric contract, MeliusNet, ABC-Net, the registry, counts."""

import pytest
import torch
import torch.nn.functional as F

from sw import packing
from sw.models import (
    MODELS,
    ABCConv2d,
    BinaryConv2d,
    BinaryLinear,
    ImprovementBlock,
    MeliusNet,
    build_model,
    sign,
    sign_ste,
)
from sw.models.abcnet import weight_shifts
from sw.models.binary import ChannelShuffle
from sw.models.meliusnet import MELIUSNET_SPECS
from sw.models.summary import format_table, summarize_registered, summary

SMALL_MODELS = [name for name, spec in MODELS.items()
                if spec.reference_inputs[0]["input_size"] < 64]
IMAGENET_MODELS = [name for name in MODELS if name not in SMALL_MODELS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models are small: one thread avoids oversubscribing a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return build_model(name, **kwargs)


class TestSign:
    def test_sign_of_zero_is_plus_one(self):
        x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
        assert sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
        assert sign_ste(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]

    def test_clipped_straight_through_gradient(self):
        x = torch.tensor([-2.0, -1.31, -1.3, -0.5, 0.0, 0.7, 1.3, 1.31, 5.0], requires_grad=True)
        upstream = torch.arange(1.0, 10.0)
        (sign_ste(x) * upstream).sum().backward()
        expected = [0, 0, 3, 4, 5, 6, 7, 0, 0]
        assert x.grad.tolist() == expected, f"expected {expected}, got {x.grad.tolist()}"

    def test_threshold_none_passes_every_gradient(self):
        x = torch.tensor([-5.0, 0.0, 5.0], requires_grad=True)
        sign_ste(x, None).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0, 1.0]

    def test_bad_threshold(self):
        with pytest.raises(ValueError, match=r"threshold must be a positive number or None, "
                                             r"not -1"):
            BinaryConv2d(2, 2, 3, threshold=-1)


def im2col_counts(conv, x):
    """Reference counts of a (groups=1) BinaryConv2d through sw.packing's GEMM reference."""
    xb = F.pad(sign(x), (conv.padding,) * 4, value=-1.0)
    columns = F.unfold(xb, conv.kernel_size, stride=conv.stride)  # (B, C*k*k, L)
    weights = conv.weight_signs().reshape(conv.out_channels, -1)
    out = []
    for image in columns:
        out.append(torch.from_numpy(packing.reference_counts(weights, image)))
    return torch.stack(out).float()


class TestBinaryConv2d:
    def test_minus_one_padding_at_borders(self):
        conv = BinaryConv2d(2, 1, 3, padding=1)
        with torch.no_grad():
            conv.weight.fill_(0.5)
        counts = conv(torch.ones(1, 2, 4, 4))[0, 0]
        # An all-+1 input against all-+1 weights agrees everywhere but in padding (bit 0): the
        # count is 2 channels x the kernel positions inside the image.
        expected = torch.tensor([[8, 12, 12, 8], [12, 18, 18, 12],
                                 [12, 18, 18, 12], [8, 12, 12, 8]], dtype=torch.float32)
        assert torch.equal(counts, expected), f"expected {expected}, got {counts}"

    def test_all_minus_one_input_agrees_with_padding(self):
        conv = BinaryConv2d(1, 1, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.fill_(-1.0)
        counts = conv(-torch.ones(1, 1, 5, 5))
        assert torch.equal(counts, torch.full((1, 1, 3, 3), 9.0))

    @pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding"),
                             [(3, 4, 3, 1, 1), (5, 2, 3, 2, 1), (4, 3, 1, 1, 0), (2, 2, 3, 2, 0)])
    def test_counts_match_gemm_reference(self, cin, cout, k, stride, padding):
        torch.manual_seed(cin * 100 + cout)
        conv = BinaryConv2d(cin, cout, k, stride=stride, padding=padding)
        x = torch.randn(2, cin, 7, 6)
        x[0, 0, 0, :3] = 0.0  # sign(0) = +1 inside the image
        counts = conv(x)
        assert torch.equal(counts, counts.round())
        assert counts.min() >= 0 and counts.max() <= conv.fan_in
        expected = im2col_counts(conv, x).reshape(counts.shape)
        mismatch = (counts != expected).nonzero()
        assert len(mismatch) == 0, (f"first mismatch at {mismatch[0].tolist()}: expected "
                                    f"{expected[tuple(mismatch[0])]}, got "
                                    f"{counts[tuple(mismatch[0])]}")

    def test_grouped_fan_in(self):
        conv = BinaryConv2d(8, 4, 3, padding=1, groups=4)
        assert conv.fan_in == 2 * 9
        counts = conv(torch.randn(1, 8, 5, 5))
        assert counts.max() <= 18 and torch.equal(counts, counts.round())

    def test_weight_signs_and_bits(self):
        conv = BinaryConv2d(1, 1, 2)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[[[0.0, -0.1], [0.2, -0.0]]]]))
        assert conv.weight_signs().dtype == torch.int8
        assert conv.weight_signs().flatten().tolist() == [1, -1, 1, 1]
        assert conv.weight_bits().flatten().tolist() == [True, False, True, True]

    def test_gradients_reach_input_and_weight(self):
        conv = BinaryConv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
        conv(x).square().sum().backward()
        assert x.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0

    def test_bad_groups(self):
        with pytest.raises(ValueError, match=r"must be divisible by groups \(4\)"):
            BinaryConv2d(6, 4, 3, groups=4)


def test_binary_linear_counts():
    torch.manual_seed(1)
    layer = BinaryLinear(10, 3)
    x = torch.randn(4, 10)
    counts = layer(x)
    expected = packing.reference_counts(layer.weight_signs(), sign(x).T).T
    assert torch.equal(counts, torch.from_numpy(expected).float())


def test_channel_shuffle():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]


# Transitions (channels in -> out) and final channels as listed in PAPERS.md.
PAPER_TRANSITIONS = {
    "22": ([(320, 160), (480, 224), (480, 256)], 512),
    "29": ([(320, 128), (512, 192), (704, 256)], 640),
    "42": ([(384, 160), (672, 256), (1152, 416)], 1056),
    "59": ([(448, 192), (960, 320), (1856, 544)], 1312),
    "A": ([(320, 160), (480, 256), (576, 288)], 672),
    "B": ([(320, 160), (544, 224), (736, 320)], 704),
    "C": ([(256, 128), (448, 192), (832, 288)], 672),
}


class TestMeliusNet:
    def test_meliusnet22_counts(self):
        s = summary(meta_model("meliusnet22", num_classes=1000, in_channels=3, input_size=224))
        assert s.total_params == 6_944_584
        assert (s.binary_params, s.fp_params) == (6_119_424, 825_160)
        assert f"{s.size_mib:.2f}" == "3.88"
        assert f"{s.ops / 1e8:.2f}" == "2.08"
        assert (s.binary_macs, s.fp_macs) == (4_624_220_160, 135_876_608)

    @pytest.mark.parametrize("variant", list(MELIUSNET_SPECS))
    def test_variant_structure(self, variant):
        model = meta_model(f"meliusnet{variant}", num_classes=1000, in_channels=3,
                           input_size=224)
        transitions, final = PAPER_TRANSITIONS[variant]
        assert [(t.in_channels, t.out_channels) for t in model.transitions] == transitions
        assert model.num_features == final
        groups = MELIUSNET_SPECS[variant][2]
        assert all(t.conv.groups == groups for t in model.transitions)
        blocks = [len(stage) // 2 for stage in model.blocks]
        assert tuple(blocks) == MELIUSNET_SPECS[variant][0]
        stem_convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.groups, c.stride[0]) for c in stem_convs] == [
            (3, 32, 1, 2), (32, 32, 4, 1), (32, 64, 8, 1)]

    def test_improvement_block_adds_into_last_channels(self):
        torch.manual_seed(2)
        block = ImprovementBlock(6, 2).eval()
        x = torch.randn(1, 6, 4, 4)
        out = block(x)
        assert torch.equal(out[:, :4], x[:, :4])
        new = block.conv(block.act(block.bn(x)))
        assert torch.equal(out[:, 4:], x[:, 4:] + new)

    def test_too_small_input(self):
        with pytest.raises(ValueError, match=r"input_size 6 is too small for meliusnet22"):
            build_model("meliusnet22", num_classes=10, in_channels=1, input_size=6,
                        stem_reduction=2)

    def test_plain_has_melius_binary_size_and_no_improvement(self):
        counts = [summary(meta_model(name, num_classes=10, in_channels=1, input_size=28))
                  for name in ("meliusnet-small", "binary-plain-small")]
        assert counts[0].binary_params == counts[1].binary_params
        plain = build_model("binary-plain-small", num_classes=10, in_channels=1, input_size=8)
        assert not any(isinstance(m, ImprovementBlock) for m in plain.modules())

    @pytest.mark.parametrize("name", ["fp-small", "fp-plain-small"])
    def test_full_precision_counterparts(self, name):
        model = build_model(name, num_classes=10, in_channels=1, input_size=8)
        assert not any(isinstance(m, BinaryConv2d) for m in model.modules())
        assert summary(model).binary_params == 0


class TestABCConv2d:
    def test_weight_shifts(self):
        assert weight_shifts(1).tolist() == [0.0]
        assert weight_shifts(5).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]

    @pytest.mark.parametrize("M", [1, 2, 3, 5])
    def test_bases_and_least_squares_alphas(self, M):
        torch.manual_seed(M)
        conv = ABCConv2d(4, 6, 3, M=M, N=1)
        bases, alpha = conv.weight_bases()
        w = conv.weight.detach()
        u = weight_shifts(M).view(-1, 1, 1, 1, 1)
        expected = sign(w - w.mean() + u * w.std(unbiased=False))
        assert torch.equal(bases.detach(), expected)
        matrix = bases.detach().reshape(M, -1).T.double()
        reference = torch.linalg.lstsq(matrix, w.reshape(-1, 1).double()).solution.flatten()
        torch.testing.assert_close(alpha.double(), reference, rtol=1e-4, atol=1e-6)
        residual = (matrix @ alpha.double() - w.reshape(-1).double()).square().sum()
        best = (matrix @ reference - w.reshape(-1).double()).square().sum()
        assert residual <= best * (1 + 1e-6)

    @pytest.mark.parametrize(("M", "N", "stride", "padding"),
                             [(1, 1, 1, 1), (3, 2, 2, 1), (2, 3, 1, 0)])
    def test_forward_is_sum_of_binary_convs(self, M, N, stride, padding):
        torch.manual_seed(10 * M + N)
        conv = ABCConv2d(3, 4, 3, stride, padding, M=M, N=N)
        with torch.no_grad():
            conv.shifts.add_(torch.randn(N) * 0.1)
            conv.scales.mul_(torch.rand(N) + 0.5)
        x = torch.randn(2, 3, 6, 6)
        counts = conv.base_counts(x)
        assert counts.shape[:2] == (N, M)
        assert torch.equal(counts, counts.round())
        assert counts.min() >= 0 and counts.max() <= conv.fan_in
        torch.testing.assert_close(conv(x), conv.combine(counts), rtol=1e-5, atol=1e-4)

    def test_activation_straight_through_window(self):
        conv = ABCConv2d(1, 1, 1, M=1, N=1)
        with torch.no_grad():
            conv.shifts.fill_(0.25)
        x = torch.tensor([-1.0, -0.25, 0.0, 0.75, 1.0]).view(1, 1, 1, 5).requires_grad_()
        conv.activation_bases(x).sum().backward()
        # 0 <= x + v <= 1 with v = 0.25: x in [-0.25, 0.75].
        assert x.grad.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
        assert conv.shifts.grad.item() == 3.0


def test_registry_names():
    required = {"meliusnet22", "meliusnet29", "meliusnet42", "meliusnet59", "meliusnetA",
                "meliusnetB", "meliusnetC", "meliusnet-small", "abcnet-resnet18",
                "abcnet-resnet34", "abcnet-small", "binary-plain-small", "fp-small"}
    assert required <= set(MODELS)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"model must be one of .*, not 'resnet'"):
        build_model("resnet", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(TypeError):
        build_model("meliusnet-small", num_classes=10, in_channels=1, input_size=8, colour=1)
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer, not 0"):
        build_model("meliusnet-small", num_classes=0, in_channels=1, input_size=8)


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("size", [8, 28])
def test_small_models_forward_and_backward(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, input_size=size)
    x = torch.randn(4, 1, size, size)
    logits = model(x)
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    binary = [m for m in model.modules() if isinstance(m, (BinaryConv2d, ABCConv2d))]
    assert all(m.weight.grad.abs().sum() > 0 for m in binary)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_models_at_small_sizes(name):
    # Shapes only (meta device): a real pass of the largest variants costs seconds.
    for size, channels in ((8, 1), (28, 1), (32, 3)):
        model = meta_model(name, num_classes=10, in_channels=channels, input_size=size)
        assert model(torch.empty(2, channels, size, size, device="meta")).shape == (2, 10)


def test_imagenet_model_runs_on_cpu():
    torch.manual_seed(0)
    model = build_model("meliusnetC", num_classes=10, in_channels=3, input_size=16)
    assert isinstance(model, MeliusNet)
    logits = model(torch.randn(2, 3, 16, 16))
    logits.sum().backward()
    assert logits.shape == (2, 10) and model.blocks[0][0].conv.weight.grad is not None


def test_summary_table_lists_every_variant():
    summaries = summarize_registered()
    names = {s.name for s in summaries}
    assert names == set(MODELS)
    table = format_table(summaries)
    assert "6,944,584" in table
    assert format_table(summaries, markdown=True).count("\n") == len(summaries) + 1
