"""MNIST's preprocessing recipe (preprocess.to_mnist) against plain-numpy oracles: the ink's box
fitted into 20x20 with its aspect ratio, the centre of mass on (14, 14), polarity, colour and
transparency handled, photo noise and specks ignored, MNIST-form images passed through."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from digitlens import preprocess
from digitlens.errors import DigitlensError

REAL_MNIST = os.environ.get("DIGITLENS_DATA")


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    """Plain formula: sum(index * value) / sum(value) along each axis."""
    rows, cols = np.indices(img.shape)
    return float((rows * img).sum() / img.sum()), float((cols * img).sum() / img.sum())


def ink_box(img: np.ndarray, level: float = 0.5) -> tuple[int, int]:
    """Height and width of the pixels above ``level``."""
    rows = np.flatnonzero((img > level).any(axis=1))
    cols = np.flatnonzero((img > level).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def best_shifted_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Largest Pearson correlation of ``a`` shifted by up to one pixel each way with ``b``
    (rounding the centre of mass may move a digit by one pixel)."""
    return max(np.corrcoef(np.roll(a, (dy, dx), axis=(0, 1)).ravel(), b.ravel())[0, 1]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def drawn_digit(size=(160, 220), box=(40, 30, 100, 150), width=9, ink=30, paper=225, noise=0.0, seed=0) -> np.ndarray:
    """A '0'-like ellipse ring drawn with Pillow at ``box`` (left, top, right, bottom): uint8 (H, W)."""
    img = Image.new("L", (size[1], size[0]), paper)
    ImageDraw.Draw(img).ellipse(box, outline=ink, width=width)
    arr = np.asarray(img, dtype=np.float64)
    if noise:
        arr = arr + np.random.default_rng(seed).normal(0, noise, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_the_ink_box_is_fitted_into_20x20_keeping_its_aspect_ratio_and_centred_by_mass():
    tall = drawn_digit(box=(40, 30, 100, 150))  # 61 wide, 121 tall
    out = preprocess.to_mnist(tall)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    img = out[0].numpy()
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.99
    h, w = ink_box(img)
    assert h in (19, 20) and abs(w / h - 61 / 121) < 0.1
    r, c = centre_of_mass(img)
    assert abs(r - 14) <= 0.5 and abs(c - 14) <= 0.5
    wide = preprocess.to_mnist(drawn_digit(box=(20, 60, 200, 100)))[0].numpy()  # 181 wide, 41 tall
    h, w = ink_box(wide)
    assert w in (19, 20) and abs(h / w - 41 / 181) < 0.1


def test_polarity_colour_and_transparency_give_the_same_digit():
    dark_on_light = drawn_digit()
    reference = preprocess.to_mnist(dark_on_light)
    light_on_dark = 255 - dark_on_light
    torch.testing.assert_close(preprocess.to_mnist(light_on_dark), reference, atol=1e-5, rtol=0)
    rgb = np.stack([dark_on_light] * 3, axis=-1)
    torch.testing.assert_close(preprocess.to_mnist(Image.fromarray(rgb)), reference, atol=1e-5, rtol=0)
    # black ink on a transparent background, as drawing apps export it: laid over white paper
    rgba = np.zeros(dark_on_light.shape + (4,), np.uint8)
    rgba[..., 3] = 255 - dark_on_light  # opaque where the ink is
    out, steps = preprocess.to_mnist(Image.fromarray(rgba), return_steps=True)
    assert steps.inverted
    assert np.corrcoef(out.ravel().numpy(), reference.ravel().numpy())[0, 1] > 0.99
    _, steps = preprocess.to_mnist(light_on_dark, return_steps=True)
    assert not steps.inverted


def test_photo_noise_and_specks_do_not_move_the_box():
    clean = preprocess.to_mnist(drawn_digit())
    noisy = drawn_digit(noise=10.0)
    noisy[5:8, 5:8] = 20  # a speck of dirt in the corner, dark like ink
    noisy[150:152, 200:203] = 25
    out, steps = preprocess.to_mnist(noisy, return_steps=True)
    # the ellipse only (Pillow's box is inclusive), to a pixel: the specks are far outside it
    np.testing.assert_allclose(steps.bbox, (30, 151, 40, 101), atol=1)
    assert best_shifted_correlation(out[0].numpy(), clean[0].numpy()) > 0.95


def test_an_image_in_mnist_form_passes_through_unchanged():
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 11:16] = rng.integers(100, 256, (16, 5))  # a light stroke on black: MNIST form
    out, steps = preprocess.to_mnist(digit, return_steps=True)
    assert steps.passthrough
    assert torch.equal(out, torch.from_numpy(digit.astype(np.float32) / 255.0).unsqueeze(0))
    refit = preprocess.to_mnist(digit, passthrough=False)[0].numpy()
    assert ink_box(refit)[0] in (19, 20)  # the recipe stretches the 16-pixel stroke to 20
    # 28x28 but dark ink on light paper is not MNIST form: it is inverted and refitted
    _, steps = preprocess.to_mnist(255 - digit, return_steps=True)
    assert not steps.passthrough and steps.inverted


def test_steps_record_every_stage_and_end_with_the_output():
    out, steps = preprocess.to_mnist(drawn_digit(), return_steps=True)
    titles = [t for t, _ in steps.stages]
    assert len(titles) == 5 and titles[0].startswith("input") and titles[-1].startswith("centred")
    assert steps.stages[0][1].shape == (160, 220)
    assert steps.stages[3][1].shape in ((20, 10), (20, 11))  # the fitted box, 61 x 121 scaled to 20 tall
    np.testing.assert_array_equal(steps.stages[-1][1], out[0].numpy())


def test_files_are_read_and_bad_input_is_one_line(tmp_path):
    path = tmp_path / "zero.jpg"
    Image.fromarray(drawn_digit()).save(path, quality=95)
    assert preprocess.to_mnist(path).shape == (1, 28, 28)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((50, 50), 250, np.uint8)).save(blank)
    cases = [
        (blank, f"{blank}: no ink found"),
        (tmp_path / "missing.png", "missing.png: file not found"),
        (np.zeros((5, 5, 2)), "expected shape (H, W), (H, W, 3) or (H, W, 4)"),
        (np.full((5, 5), 2.0), "float pixels must lie in [0, 1]"),
    ]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    cases.append((garbage, f"{garbage}: not a readable image"))
    for image, message in cases:
        with pytest.raises(DigitlensError) as info:
            preprocess.to_mnist(image)
        assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.mnist
@pytest.mark.skipif(not REAL_MNIST, reason="DIGITLENS_DATA is not set (folder with the MNIST .gz files)")
def test_an_enlarged_inverted_mnist_digit_on_paper_comes_back_to_its_mnist_form():
    """MNIST digits are made by this recipe, so undoing a scan of one gives the digit back (up to a
    one-pixel shift from rounding the centre of mass)."""
    from digitlens import data

    test = data.load_mnist_split(data.locate_mnist(download=False), "test")
    rng = np.random.default_rng(0)
    best = []
    for k in range(40):
        digit = test.images[k, 0].numpy()
        big = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize((112, 112), Image.Resampling.BILINEAR))
        paper = np.full((200, 260), 215.0)
        top, left = rng.integers(0, 88), rng.integers(0, 148)
        paper[top:top + 112, left:left + 112] -= big * 0.75
        paper = np.clip(paper + rng.normal(0, 6, paper.shape), 0, 255).astype(np.uint8)
        best.append(best_shifted_correlation(preprocess.to_mnist(paper)[0].numpy(), digit))
    assert np.mean(best) > 0.93 and np.min(best) > 0.8, (np.mean(best), np.min(best))
