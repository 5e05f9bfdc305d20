"""The simulated device under random and corrupted frames: every frame gets the reply the
protocol promises, nothing hangs, and a model loaded before still infers bit-exactly after.
(The full 10,000-frame run is ``python -m bench.fuzz``.)"""

import numpy as np
import torch

from sim.board import BoardProcess
from sim.fuzz import KINDS, fuzz
from sw.compile import golden
from sw.driver import Device
from sw.runtime import Accelerator
from tests.compile_nets import compile_net, raw_images
from tests.test_network_end_to_end import BOARD_LIMITS, CONFIG


def test_fuzzed_device_still_infers_bit_exactly():
    torch.set_num_threads(1)
    _, artifact = compile_net("abc", 9, config=CONFIG)
    images = raw_images(99, 2, 8).numpy()
    expected = golden.run(artifact.program, torch.as_tensor(images)).numpy()
    with BoardProcess(CONFIG, **BOARD_LIMITS) as board, \
            Device.open(board.url, timeout=10.0, time_scale=board.time_scale) as device:
        accelerator = Accelerator(device, artifact.program)
        assert np.array_equal(accelerator.infer(images[0]).logits, expected[0])
        report = fuzz(device, 400, seed=1, reply_timeout=5.0,
                      byte_timeout_s=CONFIG.byte_timeout_us / 1e6)
        for index, image in enumerate(images):
            assert np.array_equal(accelerator.infer(image).logits, expected[index])
    print(report.as_dict())
    assert report.frames == 400
    assert set(report.by_kind) == set(KINDS), report.by_kind
    assert report.hangs == 0 and report.wrong_replies == 0 and report.resyncs == 0, \
        report.first_problems
    assert report.replies == report.frames - report.by_kind["garbage"]
    assert report.ok_answered == report.by_kind["valid"]
