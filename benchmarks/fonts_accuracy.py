"""How well does an MNIST-trained CNN read printed digits once they go through MNIST's own
preprocessing (``digitlens.preprocess.to_mnist``), against a plain resize to 28x28?

Renders the digits 0-9 with Pillow in the TrueType fonts that ship with matplotlib (DejaVu, STIX,
Computer Modern), at several sizes and random offsets on a 256x192 page with Gaussian noise, in
both polarities (dark ink on light paper, light ink on a dark board), and predicts each with the
default CNN trained for 1 epoch on MNIST (``--run RUN`` to use a trained run instead). Columns:

  recipe            to_mnist: greyscale, polarity, crop to the ink, fit into 20x20, centre by mass;
  naive             greyscale and an anti-aliased resize of the whole page to 28x28;
  naive, inverted   the same, inverted when the ink is dark (the polarity told, not detected);
  naive, levelled   and the page's median subtracted, scaled so the ink reaches 1 (a black
                    background like MNIST's): what is left to the recipe is the crop, the 20x20
                    fit and the centring.

Prints markdown tables: accuracy per font and polarity, per font size, and overall.

    python benchmarks/fonts_accuracy.py [--data-dir DIR] [--run RUN] [--offsets 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSerif", "DejaVuSerif-Italic",
         "DejaVuSansMono", "STIXGeneral", "cmr10")
SIZES = (40, 80, 140)  # font size in pixels; the page is 192 pixels tall
PAGE = (256, 192)  # width, height
POLARITIES = {"dark on light": (40, 215), "light on dark": (230, 30)}  # (ink, paper) grey levels
NOISE = 6.0  # standard deviation of the page's noise, in grey levels


def render(digit: int, font_path: str, size: int, polarity: str, rng: np.random.Generator) -> np.ndarray:
    """``digit`` drawn at a random position that keeps it on the page: uint8 array (192, 256)."""
    from PIL import Image, ImageDraw, ImageFont

    ink, paper = POLARITIES[polarity]
    font = ImageFont.truetype(font_path, size)
    img = Image.new("L", PAGE, paper)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    x = rng.integers(4, max(5, PAGE[0] - (right - left) - 4)) - left
    y = rng.integers(4, max(5, PAGE[1] - (bottom - top) - 4)) - top
    draw.text((int(x), int(y)), str(digit), fill=ink, font=font)
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, NOISE, (PAGE[1], PAGE[0]))
    return np.clip(arr, 0, 255).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"))
    parser.add_argument("--run", default=None, help="run folder of the model (default: train the CNN for 1 epoch)")
    parser.add_argument("--offsets", type=int, default=3, help="random positions per font, size, digit and polarity")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import matplotlib
    import torch

    from digitlens import models
    from digitlens.inference import predict_proba
    from digitlens.preprocess import naive_resize, to_mnist

    run = args.run
    if run is None:
        from digitlens.train import train

        run = os.path.join(tempfile.mkdtemp(prefix="digitlens-bench-"), "mnist_cnn")
        t0 = time.perf_counter()
        train(run, dataset="mnist", model="cnn", epochs=1, data_dir=args.data_dir, progress=False)
        print(f"trained {run} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    model = models.load_model(run)
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng(args.seed)
    rows = []  # (font, size, polarity, digit, then the model input of each column)
    recipe_seconds = 0.0
    for font in FONTS:
        for size in SIZES:
            for polarity in POLARITIES:
                for digit in range(10):
                    for _ in range(args.offsets):
                        page = render(digit, str(font_dir / f"{font}.ttf"), size, polarity, rng)
                        t0 = time.perf_counter()
                        recipe = to_mnist(page)
                        recipe_seconds += time.perf_counter() - t0
                        naive = naive_resize(page)
                        told = 1.0 - naive if polarity == "dark on light" else naive
                        background = told.median()
                        levelled = ((told - background) / (told.max() - background)).clamp(0, 1)
                        rows.append((font, size, polarity, digit, recipe, naive, told, levelled))
    labels = np.array([r[3] for r in rows])
    predictions = {}
    for k, name in ((4, "recipe"), (5, "naive"), (6, "naive, inverted"), (7, "naive, levelled")):
        predictions[name] = predict_proba(model, torch.stack([r[k] for r in rows])).argmax(axis=1)
    correct = {name: pred == labels for name, pred in predictions.items()}
    columns = list(predictions)

    def line(label, mask):
        cells = " | ".join(f"{correct[c][mask].mean():.1%}" for c in columns)
        return f"| {label} | {int(mask.sum())} | {cells} |"

    fonts = np.array([r[0] for r in rows])
    sizes = np.array([r[1] for r in rows])
    polarities = np.array([r[2] for r in rows])
    print(f"model: {run}; {len(rows)} images ({len(FONTS)} fonts x {len(SIZES)} sizes x {len(POLARITIES)} "
          f"polarities x 10 digits x {args.offsets} offsets), page {PAGE[0]}x{PAGE[1]}, noise sd {NOISE:g}; "
          f"to_mnist {1000 * recipe_seconds / len(rows):.1f} ms per image\n")
    print("| font | polarity | images | " + " | ".join(columns) + " |")
    print("|---|---|---:|" + "---:|" * len(columns))
    for font in FONTS:
        for polarity in POLARITIES:
            mask = (fonts == font) & (polarities == polarity)
            print(line(font, mask).replace(f"| {font} |", f"| {font} | {polarity} |", 1))
    for polarity in POLARITIES:
        print(line(f"**all fonts** | {polarity}", polarities == polarity))
    print(line("**all** | both", np.ones(len(rows), bool)))
    print("\n| font size (px) | images | " + " | ".join(columns) + " |")
    print("|---:|---:|" + "---:|" * len(columns))
    for size in SIZES:
        print(line(str(size), sizes == size))
    print("\n| digit | images | " + " | ".join(columns) + " |")
    print("|---:|---:|" + "---:|" * len(columns))
    for digit in range(10):
        print(line(str(digit), labels == digit))


if __name__ == "__main__":
    main()
