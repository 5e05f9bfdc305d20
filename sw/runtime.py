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
        Show progress bars (tqdm, on standard error) over all the long work: the descriptors
        and resident weights written here, and in :meth:`infer_batch` the weight segments
        streamed and the runs of each image.
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
        self.progress = progress
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

    def _write_all(self, writes, progress=False, description="loading model"):
        """Write ``(memory name, address, words)`` blocks, with a progress bar in bytes
        (``description``; one that is not ``"loading model"`` is removed when done)."""
        from .packing import word_bytes
        sizes = [len(words) * word_bytes(self.device.word_width(Memory[memory]))
                 for memory, _, words in writes]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=description,
                       leave=description == "loading model")
        try:
            # Pipelined (the device's receive buffer permitting); the errors come at the end.
            pending = []
            for (memory, address, words), size in zip(writes, sizes):
                # Chunks of at most 256 words keep the bar moving on a slow link.
                for first in range(0, len(words), 256):
                    chunk = words[first:first + 256]
                    pending.append(self.device.write_words(Memory[memory], address + first,
                                                           chunk, wait=False))
                    if bar is not None:
                        bar.update(size * len(chunk) // len(words))
            for write in pending:
                write.result()
        finally:
            if bar is not None:
                bar.close()

    def _load_segment(self, segment, progress=False, description=""):
        self._write_all(segment.writes, progress, description)
        self._loaded_writes = self._kept_writes()

    def _raw(self, image):
        """``image`` checked against the program's input: the words to write at the device
        program's ``input_base`` in its ``input_memory`` (INTS elements, or the bit-planes of
        an 8-bit image in BITS when the first layer runs as bit-planes:
        :meth:`sw.compile.codegen.DeviceProgram.input_words`)."""
        return self.device_program.input_words(image)

    def _write_image(self, raw):
        """Send the image's words (:meth:`_raw`) without waiting (a
        :class:`sw.driver.Pending`). INTS elements go as WRITE8, one byte per pixel, when every
        pixel lies in 0 .. 255 (``raw`` holds the two's complement words, so a negative pixel
        is a large word), else as WRITE; bit-planes in BITS are already a byte per pixel and
        channel (a ``lane``-bit word holds ``lane / 8`` channels' 8 planes) and go as WRITE."""
        dp = self.device_program
        memory = Memory[dp.input_memory]
        if memory == Memory.INTS and all(word <= 0xFF for word in raw):
            return self.device.write8(dp.input_base, raw, wait=False)
        return self.device.write_words(memory, dp.input_base, raw, wait=False)

    def _run_segment(self, segment):
        """Send the RUN of the segment's ops and the read of their counters without waiting;
        return their :class:`sw.driver.Pending` ``(cycles, counters)``."""
        dp = self.device_program
        # The ops' cycles are known exactly (sw.isa.op_cycles); the device aborts a run that
        # takes twice as long.
        estimate = sum(op.cycles for op in dp.ops[segment.first:segment.first + segment.count])
        cycles = self.device.run_ops(segment.first, segment.count, estimated_cycles=estimate,
                                     max_cycles=2 * estimate + 1000, wait=False)
        return cycles, self.device.op_cycles(segment.first, segment.count, wait=False)

    def infer(self, image, *, progress=None):
        """Run one raw image ``(C, H, W)`` of integer pixels; return an :class:`InferenceResult`.

        ``progress`` as for :meth:`infer_batch`.

        Raises
        ------
        ValueError
            If the image has the wrong shape or values that do not fit an INTS element (or,
            when the first layer runs as bit-planes, pixels outside ``0 .. 255``).
        """
        return self.infer_batch([image], progress=progress)[0]

    def infer_batch(self, images, *, progress=None):
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
        written, run and read back in turn, the weights staying loaded. Images whose pixels
        all lie in 0 .. 255 travel as one byte per pixel (WRITE8).

        The requests are pipelined (:meth:`sw.driver.Device.submit`): the next image's write
        and run are sent while the device still computes, within its receive buffer, and the
        replies are collected as the buffer needs and at the end.

        ``progress`` (default: the ``progress`` given to the constructor) shows a bar over
        the runs (one per image and segment) and, with streamed weights, one in bytes over
        each segment's weights while they load (on a simulated board these take minutes).

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
        progress = self.progress if progress is None else progress
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(raws) * len(dp.segments), unit="run", desc="running",
                       leave=False)
        try:
            return self._infer_batch(raws, bar)
        finally:
            if bar is not None:
                bar.close()

    def _infer_batch(self, raws, bar):
        dp = self.device_program
        if self._kept_writes() != self._loaded_writes:
            # A GEMM (which uses WEIGHTS) or another program was run on this device since.
            self._load_resident(bar is not None)
        runs = [[] for _ in raws]       # per image: its segments' (cycles, counters) Pending
        writes = []                     # the Pending of every write, for their errors
        saved = [None] * len(raws)      # per image: the carried tensors' bytes (Pending)
        logits = [None] * len(raws)
        order = list(range(len(raws)))
        on_device = None                # the image whose tensors the memories hold
        for number, segment in enumerate(dp.segments):
            segments = f"segment {number + 1}/{len(dp.segments)}"
            if not self._resident:
                if bar is not None:
                    bar.set_description_str(f"running ({segments}: loading weights)")
                self._load_segment(segment, bar is not None, f"{segments} weights")
            last = number == len(dp.segments) - 1
            for position, index in enumerate(order):
                if bar is not None:
                    bar.set_description_str(
                        f"running ({segments}, image {position + 1}/{len(raws)})"
                        if len(dp.segments) > 1 else
                        f"running (image {position + 1}/{len(raws)})")
                if number == 0:
                    writes.append(self._write_image(raws[index]))
                elif index != on_device:
                    for (memory, base, _), data in zip(self.carried[number], saved[index]):
                        writes.append(self.device.write(memory, base, data.result(),
                                                        wait=False))
                runs[index].append(self._run_segment(segment))
                if last:
                    logits[index] = self.device.read_words(Memory.INTS, dp.logits_base,
                                                           dp.logits_count, wait=False)
                elif index != order[-1]:
                    saved[index] = [self.device.read(memory, base, size, wait=False)
                                    for memory, base, size in self.carried[number + 1]]
                on_device = index
                if bar is not None:
                    bar.update()
            order.reverse()
        for write in writes:
            write.result()
        results = []
        for index in range(len(raws)):
            done = [(cycles.result(), counters.result()) for cycles, counters in runs[index]]
            results.append(InferenceResult(
                np.array(_to_signed(logits[index].result(), self.element_width),
                         dtype=np.int64),
                sum(cycles for cycles, _ in done),
                [count for _, counters in done for count in counters]))
        return results
