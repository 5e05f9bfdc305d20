"""sw.run_inference: image inputs, errors, and the same answer from the golden model and the
simulated board."""

import numpy as np
import pytest
import torch
from PIL import Image

import sw
from sim.board import BoardProcess
from sw.compile import golden
from sw.inference import ImageError, clear_cache, prepare_images
from tests.compile_nets import compile_net, raw_images
from tests.test_network_end_to_end import BOARD_LIMITS, CONFIG


@pytest.fixture(scope="module")
def artifact():
    torch.set_num_threads(1)
    return compile_net("melius", 5, config=CONFIG)[1]


def expected(artifact, raw):
    return golden.run(artifact.program, torch.as_tensor(raw)).numpy()


def test_arrays_tensors_and_batches_on_the_golden_model(artifact):
    raw = raw_images(11, 3, 8).numpy()
    want = expected(artifact, raw)
    one = sw.run_inference(raw[0], artifact)
    assert np.array_equal(one.logits, want[0])
    assert one.index == int(np.argmax(want[0])) and one.label == f"class{one.index}"
    assert one.device == "golden" and one.cycles is None
    assert abs(one.probabilities.sum() - 1) < 1e-9
    assert one.top(3)[0] == (one.label, float(one.probabilities.max()))
    batch = sw.run_inference(torch.as_tensor(raw), artifact)
    assert [p.logits.tolist() for p in batch] == want.tolist()
    grey = sw.run_inference(raw[1, 0], artifact)          # (H, W) for a one-channel model
    assert np.array_equal(grey.logits, want[1])
    listed = sw.run_inference([raw[2], torch.as_tensor(raw[0])], artifact)
    assert [p.logits.tolist() for p in listed] == [want[2].tolist(), want[0].tolist()]
    floats = sw.run_inference(raw[0].astype(np.float32), artifact)
    assert np.array_equal(floats.logits, want[0])


def test_files_and_pil_images_are_scaled_to_the_pixel_range(artifact, tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    # 0..255 -> 0..16, rounded half up.
    raw = np.floor(pixels.astype(np.float64) * 16 / 255 + 0.5).astype(np.int64)[None]
    want = expected(artifact, raw[None])[0]
    assert np.array_equal(sw.run_inference(path, artifact).logits, want)
    assert np.array_equal(sw.run_inference(str(path), artifact).logits, want)
    assert np.array_equal(sw.run_inference(Image.fromarray(pixels), artifact).logits, want)
    # An RGB picture of another size is converted to grey and resized.
    big = Image.fromarray(rng.integers(0, 256, (20, 30, 3)).astype(np.uint8))
    assert prepare_images(big, artifact.preprocessing)[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("image,message", [
    (np.zeros((2, 8, 8), np.int64),
     r"images must have shape \(1, 8, 8\) or \(N, 1, 8, 8\), not \(2, 8, 8\)"),
    (np.zeros((8, 9), np.int64), r"not \(8, 9\)"),
    (np.full((1, 8, 8), 0.5), "raw integer pixels"),
    (np.full((1, 8, 8), 17), r"pixel range \[0, 16\], not \[17, 17\]"),
    (np.full((1, 8, 8), True), "pixels must be numbers, not bool"),
    ("missing.png", "does not exist"),
    (42, "not int"),
    ([], "no images given"),
])
def test_bad_images_are_refused(artifact, image, message):
    with pytest.raises(ImageError, match=message):
        sw.run_inference(image, artifact)


def test_a_file_that_is_not_an_image(artifact, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(ImageError, match="not an image file"):
        sw.run_inference(path, artifact)


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model must be an artifact file path or an Artifact"):
        sw.run_inference(np.zeros((1, 8, 8)), 3)


def test_simulated_board_equals_golden_and_caches_the_model(artifact, monkeypatch):
    from sw import runtime
    loads = []
    original = runtime.Accelerator.__init__

    def counting(self, *args, **kwargs):
        loads.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(runtime.Accelerator, "__init__", counting)
    raw = raw_images(12, 3, 8).numpy()
    want = expected(artifact, raw)
    with BoardProcess(CONFIG, **BOARD_LIMITS) as board:
        try:
            options = {"device": board.url, "time_scale": board.time_scale, "timeout": 10.0}
            first = sw.run_inference(raw[0], artifact, progress=True, **options)
            rest = sw.run_inference(raw[1:], artifact, **options)
            golden_answers = sw.run_inference(raw, artifact)
        finally:
            clear_cache()
    board_answers = [first, *rest]
    assert [p.logits.tolist() for p in board_answers] == want.tolist()
    assert [p.logits.tolist() for p in golden_answers] == want.tolist()
    assert [p.index for p in board_answers] == [p.index for p in golden_answers]
    assert all(p.cycles > 0 and p.device_seconds == p.cycles / CONFIG.clock_hz
               for p in board_answers)
    assert loads == [1], "the model must be loaded into the device once"


def test_command_line(artifact, tmp_path, capsys):
    from sw.compile import save
    from sw.infer import main
    model = tmp_path / "model.bnn"
    save(artifact, model)
    pixels = np.random.default_rng(4).integers(0, 256, (8, 8)).astype(np.uint8)
    image = tmp_path / "a.png"
    Image.fromarray(pixels).save(image)
    assert main([str(image), "--model", str(model), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    want = sw.run_inference(image, model)
    assert out.startswith(f"{image}: {want.label} (class {want.index}) | top 2: ")
    assert main([str(tmp_path / "missing.png"), "--model", str(model)]) == 1
    assert "does not exist" in capsys.readouterr().err
