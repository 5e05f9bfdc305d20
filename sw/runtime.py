"""Running a compiled network on a device: load the layer program once, then infer images.

:class:`Accelerator` joins a :class:`sw.driver.Device` and a compiled program. It generates the
device program (:func:`sw.compile.codegen.generate`) for the geometry the device reports with
INFO, so a model compiled once runs on any build it fits, writes the descriptors into PROGRAM
memory once, and, for each image, writes the raw pixels into INTS memory, runs the program's
segments (loading each segment's weights first when they do not all fit on chip at once) and
reads the logits back. :meth:`Accelerator.infer_batch` runs several images with each segment's
weights loaded once for the whole batch.
"""

import dataclasses
import types

import numpy as np

from .compile.codegen import generate
from .compile.plan import lifetimes
from .driver import CapacityError, IncompatibleDeviceError
from .protocol import Memory

__all__ = ["Accelerator", "InferenceResult"]


@dataclasses.dataclass
class InferenceResult:
    """One image's answer from the device.

    Members
    -------
    logits : numpy.ndarray of int64
        The program's logits (the golden model's integers).
    cycles : int
        Device clock cycles of all ops (the sum of ``op_cycles``).
    op_cycles : list of int
        Each op's cycle counter, in program order.
    """
    logits: np.ndarray
    cycles: int
    op_cycles: list


def _to_signed(words, width):
    return [w - (1 << width) if w >> (width - 1) else w for w in words]


class Accelerator:
    """A compiled program loaded on a device.

    Parameters
    ----------
    device : :class:`sw.driver.Device`
    program : :class:`sw.compile.ir.Program` or an artifact holding one
    progress : bool
        Show a progress bar (tqdm) while the descriptors and weights are written.
    budget : optional
        An object with the memory sizes (``weight_depth``, ``coef_depth``, ``param_depth``,
        ...) to generate the program for, instead of the device's own: a smaller budget makes
        the host stream weights in more segments (for tests). It must not exceed the device.

    The descriptors and (when they fit on chip at once) the weights stay loaded between
    images. Anything else written through the same ``device`` to PROGRAM, WEIGHTS, COEFS or
    PARAMS (a :meth:`~sw.driver.Device.gemm` uses WEIGHTS, another Accelerator its own program)
    is noticed from ``device.writes``, and the next :meth:`infer` loads them again. Writes
    through another connection to the same device cannot be seen.

    Raises
    ------
    IncompatibleDeviceError
        If the device is a GEMM-only build (it cannot run layer programs).
    CapacityError
        If the program does not fit the device (the message names the op and the memory).
    """

    def __init__(self, device, program, *, budget=None, progress=False):
        from .compile.lower import CompileError
        self.device = device
        self.program = getattr(program, "program", program)
        parameters = device.parameters
        if not parameters["program_depth"]:
            raise IncompatibleDeviceError(
                "the device is a GEMM-only build (no layer program memories): build the "
                "bitstream with the layer program to run networks on it")
        if budget is not None:
            for name, value in parameters.items():
                if name.endswith("_depth") and getattr(budget, name, value) > value:
                    raise ValueError(f"budget {name} {getattr(budget, name)} exceeds the "
                                     f"device's {value}")
            parameters = {**parameters, **{name: getattr(budget, name) for name in parameters
                                           if name.endswith("_depth")
                                           and hasattr(budget, name)}}
        geometry = types.SimpleNamespace(**parameters)
        try:
            self.device_program = generate(self.program, geometry)
        except CompileError as error:
            raise CapacityError(f"the model does not fit this device: {error}") from None
        dp = self.device_program
        self.element_width = dp.geometry.element_width
        # With one segment the weights are loaded once; otherwise before each segment.
        self._resident = len(dp.segments) == 1
        #: Per segment: the blocks ``(memory, base, words)`` of the tensors that its ops and
        #: the later ones need from before it (live across its start; disjoint, being live at
        #: the same time). :meth:`infer_batch` keeps them on the host between segments.
        spans = dp.lifetimes if dp.lifetimes is not None else lifetimes(self.program)
        self.carried = [
            [(Memory[memory], base, size)
             for name, (memory, base, size) in sorted(dp.allocation.items(),
                                                      key=lambda item: item[1])
             if name in spans and spans[name][0] < segment.first <= spans[name][1]]
            for segment in dp.segments]
        self._load_resident(progress)

    #: The memories a loaded network keeps between images.
    _KEPT = ("PROGRAM", "WEIGHTS", "COEFS", "PARAMS")

    def _kept_writes(self):
        return tuple(self.device.writes[Memory[name]] for name in self._KEPT)

    def _load_resident(self, progress=False):
        """Write the descriptors and, with one segment, the weights; remember the device's
        write counts, so that :meth:`infer` notices when anything else overwrites them."""
        dp = self.device_program
        writes = [("PROGRAM", 0, dp.descriptors)]
        if self._resident:
            writes += dp.segments[0].writes
        self._write_all(writes, progress)
        self._loaded_writes = self._kept_writes()

    def _write_all(self, writes, progress=False):
        """Write ``(memory name, address, words)`` blocks, with a progress bar in bytes."""
        from .packing import word_bytes
        sizes = [len(words) * word_bytes(self.device.word_width(Memory[memory]))
                 for memory, _, words in writes]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="loading model")
        try:
            for (memory, address, words), size in zip(writes, sizes):
                # Chunks of at most 256 words keep the bar moving on a slow link.
                for first in range(0, len(words), 256):
                    chunk = words[first:first + 256]
                    self.device.write_words(Memory[memory], address + first, chunk)
                    if bar is not None:
                        bar.update(size * len(chunk) // len(words))
        finally:
            if bar is not None:
                bar.close()

    def _load_segment(self, segment):
        self._write_all(segment.writes)
        self._loaded_writes = self._kept_writes()

    def _raw(self, image):
        """``image`` checked against the program's input: the words to write at the device
        program's ``input_base`` in its ``input_memory`` (INTS elements, or the bit-planes of
        an 8-bit image in BITS when the first layer runs as bit-planes:
        :meth:`sw.compile.codegen.DeviceProgram.input_words`)."""
        return self.device_program.input_words(image)

    def _run_segment(self, segment):
        """RUN the segment's ops; return ``(cycles, their counters)``."""
        dp = self.device_program
        # The ops' cycles are known exactly (sw.isa.op_cycles); the device aborts a run that
        # takes twice as long.
        estimate = sum(op.cycles for op in dp.ops[segment.first:segment.first + segment.count])
        cycles = self.device.run_ops(segment.first, segment.count, estimated_cycles=estimate,
                                     max_cycles=2 * estimate + 1000)
        return cycles, self.device.op_cycles(segment.first, segment.count)

    def infer(self, image):
        """Run one raw image ``(C, H, W)`` of integer pixels; return an :class:`InferenceResult`.

        Raises
        ------
        ValueError
            If the image has the wrong shape or values that do not fit an INTS element (or,
            when the first layer runs as bit-planes, pixels outside ``0 .. 255``).
        """
        return self.infer_batch([image])[0]

    def infer_batch(self, images):
        """Run raw images ``(C, H, W)``; return one :class:`InferenceResult` per image, in order.

        Each image's result is the same as if it ran alone. With weight streaming (several
        segments) each segment's weights are loaded once for the whole batch instead of once
        per image: the segment runs for every image in turn, and the tensors the later
        segments need from it (those live across the segment boundary, at most the size of
        the activations there) are read back after each image and written again before its
        next segment. Segments alternate their order over the images, so the image that ran
        last keeps its tensors on the device and costs no transfer. Per image the link carries
        the image, the carried tensors twice, the counters and the logits, plus the streamed
        weights divided by the batch size. With one segment nothing is carried: each image is
        written, run and read back in turn, the weights staying loaded.

        Raises
        ------
        ValueError
            If an image has the wrong shape or values that do not fit an INTS element (before
            anything is sent to the device).
        """
        dp = self.device_program
        raws = [self._raw(image) for image in images]
        if not raws:
            return []
        if self._kept_writes() != self._loaded_writes:
            # A GEMM (which uses WEIGHTS) or another program was run on this device since.
            self._load_resident()
        cycles = [0] * len(raws)
        counters = [[] for _ in raws]
        saved = [None] * len(raws)      # per image: the carried tensors' bytes
        logits = [None] * len(raws)
        order = list(range(len(raws)))
        on_device = None                # the image whose tensors the memories hold
        for number, segment in enumerate(dp.segments):
            if not self._resident:
                self._load_segment(segment)
            last = number == len(dp.segments) - 1
            for index in order:
                if number == 0:
                    self.device.write_words(Memory[dp.input_memory], dp.input_base,
                                            raws[index])
                elif index != on_device:
                    for (memory, base, _), data in zip(self.carried[number], saved[index]):
                        self.device.write(memory, base, data)
                run_cycles, run_counters = self._run_segment(segment)
                cycles[index] += run_cycles
                counters[index] += run_counters
                if last:
                    logits[index] = np.array(_to_signed(
                        self.device.read_words(Memory.INTS, dp.logits_base, dp.logits_count),
                        self.element_width), dtype=np.int64)
                elif index != order[-1]:
                    saved[index] = [self.device.read(memory, base, size)
                                    for memory, base, size in self.carried[number + 1]]
                on_device = index
            order.reverse()
        return [InferenceResult(logits[i], cycles[i], counters[i]) for i in range(len(raws))]
