"""Progress of :class:`sw.runtime.Accelerator`: the bars cover the streamed weight segments and
the runs of every image, not only the first upload. The device is a stub that accepts every
request (no simulation): only what the bars print is checked."""

import pytest
import torch

from sw import protocol
from sw.compile.codegen import generate
from sw.protocol import Memory
from sw.runtime import Accelerator
from tests.compile_nets import compile_net, raw_images
from tests.test_network_end_to_end import CONFIG


class Done:
    """What a stub request sent without waiting returns: its result, at once."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class StubDevice:
    """Takes the calls :class:`Accelerator` makes of a :class:`sw.driver.Device` and answers
    them with zeros (runs take their estimated cycles); ``wait=False`` gives a :class:`Done`
    as the driver gives a :class:`sw.driver.Pending`."""

    def __init__(self, config):
        self.parameters = protocol.INFO.unpack(config.info())
        self.writes = dict.fromkeys(Memory, 0)

    @staticmethod
    def _reply(value, wait):
        return value if wait else Done(value)

    def word_width(self, memory):
        return protocol.memory_word_widths(self.parameters)[memory]

    def write_words(self, memory, address, words, *, wait=True):
        self.writes[memory] += 1
        return self._reply(None, wait)

    def write(self, memory, address, data, *, wait=True):
        self.writes[memory] += 1
        return self._reply(None, wait)

    def write8(self, address, values, *, wait=True):
        self.writes[Memory.INTS] += 1
        return self._reply(None, wait)

    def read_words(self, memory, address, count, *, wait=True):
        return self._reply([0] * count, wait)

    def read(self, memory, address, count, *, wait=True):
        return self._reply(bytes(count), wait)

    def run_ops(self, first, count, *, estimated_cycles, max_cycles, wait=True):
        return self._reply(estimated_cycles, wait)

    def op_cycles(self, first, count, *, wait=True):
        return self._reply([0] * count, wait)


@pytest.fixture(scope="module")
def streamed():
    """A network that the small budget splits into several weight segments."""
    torch.set_num_threads(1)
    _, artifact = compile_net("abc", 4, config=CONFIG)
    small = CONFIG.replace(weight_depth=80, coef_depth=256, param_depth=64)
    segments = len(generate(artifact.program, small).segments)
    assert segments > 1
    return artifact, small, segments


def test_progress_covers_streamed_segments_and_image_runs(streamed, capsys):
    artifact, small, segments = streamed
    accelerator = Accelerator(StubDevice(CONFIG), artifact.program, budget=small, progress=True)
    assert "loading model" in capsys.readouterr().err
    images = raw_images(77, 3, 8).numpy()
    results = accelerator.infer_batch(images)
    assert len(results) == 3
    err = capsys.readouterr().err
    for number in range(1, segments + 1):
        assert f"segment {number}/{segments} weights" in err, err[-2000:]
        assert f"running (segment {number}/{segments}: loading weights)" in err
        for image in range(1, 4):
            assert f"running (segment {number}/{segments}, image {image}/3)" in err


def test_no_progress_prints_nothing(streamed, capsys):
    artifact, small, _ = streamed
    accelerator = Accelerator(StubDevice(CONFIG), artifact.program, budget=small)
    accelerator.infer_batch(raw_images(77, 2, 8).numpy())
    accelerator.infer(raw_images(78, 1, 8).numpy()[0], progress=False)
    assert capsys.readouterr().err == ""
