"""The layer program: tensors and the small set of operations the accelerator executes.

Every value is an integer. A tensor is ``(channels, height, width)`` per image and is either
``"bits"`` (0/1, bit 1 = +1) or ``"int"`` (signed integers of at most ``bits`` bits). An integer
tensor carries one real ``scale`` per channel, known only to the compiler: channel ``c`` holds
``real = stored * scale[c]`` (counts have scale 1). Operations read channel slices of tensors and
write a channel slice of their output tensor (``mode`` ``"write"`` or ``"add"``), which is how a
DenseBlock concatenates into a stage buffer and an ImprovementBlock adds into its last channels.

The integer semantics of each kind are given in ``docs/compiler.md``; :mod:`.golden` executes
them.
"""

import dataclasses

import numpy as np

__all__ = ["KINDS", "Op", "Program", "Slice", "TensorSpec"]

#: Operation kinds and what they do (see docs/compiler.md for the exact integer semantics).
KINDS = {
    "input": "raw pixels -> (raw << shift) - zero[c]",
    "conv": "fixed-point conv (int8 weights, groups, stride, zero padding) + requantize",
    "requant": "per-channel requantize of an int tensor (folded BatchNorm, ReLU, saturation)",
    "threshold": "per-channel threshold compare of an int tensor -> bits",
    "bconv": "binary conv (xnor-popcount counts, -1 padding) of bits -> counts",
    "combine": "sum_n sum_m coef[n, m] * counts_n[m] (+ residual) + requantize (ABC-Net)",
    "maxpool": "max pool (padding never wins)",
    "shuffle": "channel shuffle",
    "gap": "global sum pool (the 1 / (H W) of the average is folded into the next layer)",
}


@dataclasses.dataclass
class TensorSpec:
    """A tensor of the program (one image's worth).

    Members
    -------
    name : str
    shape : tuple of int
        ``(channels, height, width)``.
    kind : str
        ``"bits"`` or ``"int"``.
    bits : int
        Storage width: 1 for bits, else the width that holds every value written (with a
        sign bit where ``signed``).
    scale : numpy.ndarray of float64 or None
        Real value of one step per channel (int tensors).
    """
    name: str
    shape: tuple
    kind: str
    bits: int
    scale: np.ndarray = None
    signed: bool = False

    @property
    def elements(self):
        c, h, w = self.shape
        return c * h * w

    @property
    def nbytes(self):
        """Bytes in activation memory: bits are packed, integers take whole bytes."""
        if self.kind == "bits":
            return -(-self.elements // 8)
        return self.elements * -(-self.bits // 8)


@dataclasses.dataclass(frozen=True)
class Slice:
    """Channels ``start:stop`` of tensor ``tensor``."""
    tensor: str
    start: int
    stop: int

    @property
    def channels(self):
        return self.stop - self.start


@dataclasses.dataclass
class Op:
    """One operation.

    Members
    -------
    kind : str
        A key of :data:`KINDS`.
    name : str
        Unique; names the model's module(s) it comes from (for reports and errors).
    inputs : list of Slice
    output : Slice
    mode : str
        ``"write"`` or ``"add"`` (add into the output slice).
    attrs : dict
        Small integer settings (kernel, stride, padding, groups, relu, bits, ...).
    params : dict of str -> numpy.ndarray
        Integer parameters; ``weight_bits`` of a ``bconv`` is a bool matrix ``(O, K)``.
    """
    kind: str
    name: str
    inputs: list
    output: Slice
    mode: str = "write"
    attrs: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Program:
    """A compiled network: tensors, operations in execution order, and the logits tensor."""
    tensors: dict
    ops: list
    input: str
    logits: str

    def tensor(self, name):
        return self.tensors[name]

    def is_whole(self, sl):
        """Whether the :class:`Slice` ``sl`` covers all channels of its tensor."""
        return sl.start == 0 and sl.stop == self.tensors[sl.tensor].shape[0]

    def uses(self):
        """``(readers, writers)``: ``{tensor: [indices of the ops that read it]}`` and the
        same for the ops that write it, in program order."""
        readers, writers = {}, {}
        for i, op in enumerate(self.ops):
            for sl in op.inputs:
                readers.setdefault(sl.tensor, []).append(i)
            writers.setdefault(op.output.tensor, []).append(i)
        return readers, writers
