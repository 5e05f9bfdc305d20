"""Small seeded Brevitas binary networks exported to QONNX, for the QONNX front end's tests.

* :func:`tiny_fc`: BNN-PYNQ's ``FC`` (brevitas_examples, as TFC-W1A1: binarized input, binary
  weights and activations, BatchNorm1d, ``TensorNorm``) with small widths;
* :func:`tiny_cnv`: CNV-W1A1's building blocks at 12x12x1: an 8-bit input quantizer, a 3x3
  binary conv on the codes, max pools of binary activations, a ``Pad`` of -1 before a binary
  conv, a fully connected layer on a flattened 3x3 map, ``TensorNorm``.

BatchNorm statistics and affine parameters are drawn at random (some gammas negative, so that
thresholds compare downwards and max pools need negated weights), and ``TensorNorm``'s weight
is negative (the logits' order reverses), so that the compiler's folding is exercised without
training.
"""

import contextlib
import warnings

import torch
from torch import nn

__all__ = ["export", "quiet", "randomize_norms", "tiny_cnv", "tiny_fc"]


@contextlib.contextmanager
def quiet():
    """Brevitas and torch.onnx warn on import and export (deprecations, optional packages not
    installed); the test suite turns warnings into errors, so these are silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@torch.no_grad()
def randomize_norms(model, seed, negative_output=True):
    """Random BatchNorm statistics and parameters; ``TensorNorm`` weight negative when
    ``negative_output``."""
    with quiet():
        from brevitas_examples.bnn_pynq.models.tensor_norm import TensorNorm
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 3)
            module.running_var.copy_(0.5 + 4 * torch.rand(c, generator=generator))
            module.weight.copy_(torch.rand(c, generator=generator) * 2 - 0.5)
            module.bias.copy_(torch.randn(c, generator=generator) * 0.5)
        elif isinstance(module, TensorNorm):
            module.weight.fill_(-0.75 if negative_output else 0.75)
            module.bias.fill_(0.25)
            module.running_mean.fill_(1.5)
            module.running_var.fill_(9.0)
    return model.eval()


def tiny_fc(seed=0, widths=(32, 24), act_bit_width=1, size=28):
    """BNN-PYNQ's FC with hidden ``widths`` (TFC-W1A1's quantizers) for ``size`` x ``size``
    images, random norms, eval mode."""
    with quiet():
        from brevitas_examples.bnn_pynq.models.FC import FC
        torch.manual_seed(seed)
        model = FC(num_classes=10, weight_bit_width=1, act_bit_width=act_bit_width,
                   in_bit_width=1, in_channels=1, out_features=list(widths),
                   in_features=(size, size))
    return randomize_norms(model, seed)


class TinyCNV(nn.Module):
    """CNV-W1A1's blocks at 12x12 (see the module documentation)."""

    def __init__(self, conv_padding=0):
        from brevitas.core.restrict_val import RestrictValueType
        from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
        from brevitas_examples.bnn_pynq.models.common import CommonActQuant, CommonWeightQuant
        from brevitas_examples.bnn_pynq.models.tensor_norm import TensorNorm
        super().__init__()

        def binary_act():
            return QuantIdentity(act_quant=CommonActQuant, bit_width=1)

        def conv(cin, cout, padding=0):
            return QuantConv2d(cin, cout, 3, padding=padding, bias=False,
                               weight_quant=CommonWeightQuant, weight_bit_width=1)

        self.input_quant = QuantIdentity(act_quant=CommonActQuant, bit_width=8, min_val=-1.0,
                                         max_val=1.0 - 2.0 ** -7, narrow_range=False,
                                         restrict_scaling_type=RestrictValueType.POWER_OF_TWO)
        self.features = nn.Sequential(
            conv(1, 8), nn.BatchNorm2d(8), binary_act(), nn.MaxPool2d(2),          # 10 -> 5
            nn.ConstantPad2d(1, -1.0), conv(8, 16), nn.BatchNorm2d(16), binary_act(),  # 7 -> 5
            conv(16, 16, conv_padding), nn.BatchNorm2d(16), binary_act())       # 5 -> 3
        side = 3 + 2 * conv_padding
        self.classifier = nn.Sequential(
            QuantLinear(16 * side * side, 24, bias=False, weight_quant=CommonWeightQuant,
                        weight_bit_width=1),
            nn.BatchNorm1d(24), binary_act(),
            QuantLinear(24, 10, bias=False, weight_quant=CommonWeightQuant, weight_bit_width=1),
            TensorNorm())
        for module in self.modules():
            if isinstance(module, (QuantConv2d, QuantLinear)):
                nn.init.uniform_(module.weight, -1, 1)

    def forward(self, x):
        x = self.input_quant(2.0 * x - torch.tensor([1.0]))
        x = self.features(x)
        return self.classifier(x.view(x.shape[0], -1))


def tiny_cnv(seed=0, conv_padding=0):
    """:class:`TinyCNV` with seeded weights and random norms, eval mode."""
    torch.manual_seed(seed)
    with quiet():
        model = TinyCNV(conv_padding)
    return randomize_norms(model, seed + 100)


def export(model, shape, path):
    """``export_qonnx`` of ``model`` for one image of ``shape`` ``(C, H, W)``; returns
    ``path``."""
    with quiet():
        from brevitas.export import export_qonnx
        export_qonnx(model, torch.rand(1, *shape), export_path=str(path))
    return path
