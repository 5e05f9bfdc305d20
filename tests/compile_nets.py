"""Seeded random small networks for the compiler tests (shared by test_compiler, test_artifact
and test_golden)."""

import torch
from torch import nn

from hw.config import DeviceConfig
from sw.compile import compile_model
from sw.models import ABCConv2d, build_model

#: Normalization of the random images (raw pixels 0..16, like scikit-learn's digits).
PREPROCESSING = {"mean": [6.0], "std": [5.0], "pixel_range": [0, 16]}
CLASS_NAMES = [f"class{i}" for i in range(10)]
CONFIG = DeviceConfig(rows=4, cols=4, lane=32, weight_depth=512, activation_depth=4096,
                      result_depth=512)

#: name -> (registered model, input size, options)
NETS = {
    "melius": ("meliusnet-small", 8, {"blocks": (1, 1), "transition_channels": (32,),
                                      "init_features": 16, "growth_rate": 16}),
    "melius-pool-shuffle": ("meliusnet-small", 16, {
        "blocks": (1, 1), "transition_channels": (32,), "init_features": 16,
        "growth_rate": 16, "stem_reduction": 4, "transition_groups": 2}),
    "plain": ("binary-plain-small", 8, {"blocks": (2, 1), "transition_channels": (32,),
                                        "init_features": 16, "growth_rate": 16}),
    "abc": ("abcnet-small", 8, {"blocks": (1, 1), "widths": (8, 16), "M": 2, "N": 2}),
    "abc-pool": ("abcnet-small", 16, {"blocks": (1, 1), "widths": (8, 16), "M": 1, "N": 3,
                                      "stem_reduction": 4}),
}


def raw_images(seed, count, size):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (count, 1, size, size), generator=generator)


def normalize(raw):
    return (raw.to(torch.float32) - PREPROCESSING["mean"][0]) / PREPROCESSING["std"][0]


@torch.no_grad()
def random_net(name, seed):
    """A randomly initialized network whose BatchNorm statistics are those of its inputs
    (realistic ranges), with random affine BN parameters, some negative and one zero gamma."""
    model_name, size, options = NETS[name]
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=10, in_channels=1, input_size=size, **options)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            sign = torch.where(torch.rand(c, generator=generator) < 0.2, -1.0, 1.0)
            module.weight.copy_(sign * (0.5 + torch.rand(c, generator=generator)))
            module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
            module.weight[0] = 0.0
            module.momentum = None
            module.reset_running_stats()
        if isinstance(module, ABCConv2d):
            module.shifts.add_(0.2 * torch.randn(module.N, generator=generator))
            module.scales.mul_(0.5 + torch.rand(module.N, generator=generator))
    model.train()
    model(normalize(raw_images(seed + 1000, 64, size)))
    return model.eval()


def compile_net(name, seed, config=CONFIG, calibration=64, **kwargs):
    model = random_net(name, seed)
    size = NETS[name][1]
    images = normalize(raw_images(seed + 2000, calibration, size))
    artifact = compile_model(model, config, calibration=images, preprocessing=PREPROCESSING,
                             class_names=CLASS_NAMES, **kwargs)
    return model, artifact
