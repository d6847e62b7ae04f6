"""Oracles for where a map may put its mass: models built so that a known region is all that matters.

A position or pixel that provably does not reach the output must get zero attribution, and the
per-digit maps of a model that reads only one region must lie in that region: for every method,
Grad-CAM and the ViT's attention included. These catch maps that light up what the classifier
never reads (the Grad-CAM bug of a pooling that drops a row and column) and maps drawn one patch
off (a transposed or shifted grid).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from digitlens.data import load_splits
from digitlens.explain.aggregate import PerDigitMaps
from digitlens.explain.methods import attribute, prepare_model
from digitlens.explain.run import explain_model
from digitlens.explain.methods import gradcam_layer_name, layer_reach
from digitlens.models import Attention, build_model
from training import train_briefly

# The region that matters: patch rows 1-3 and columns 2-4 of the 7x7 grid (pixels 4-15 x 8-19).
REGION = np.zeros((7, 7), dtype=bool)
REGION[1:4, 2:5] = True
PIXELS = np.kron(REGION, np.ones((4, 4), dtype=bool))  # (28, 28)


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


class RegionPatchCNN(nn.Module):
    """Reads only REGION: the input outside it is multiplied by 0, then a 4x4 stride-4 convolution
    (each cell of the 7x7 map sees exactly its own patch), a 1x1 convolution (the Grad-CAM layer,
    no bias, so cells outside the region are exactly 0) and a linear layer that reads every cell."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(PIXELS, dtype=torch.float32)[None, None])
        self.features = nn.Sequential(nn.Conv2d(1, 8, 4, stride=4, bias=False), nn.ReLU(),
                                      nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.ReLU()))
        self.classifier = nn.Linear(8 * 49, 10)

    def forward(self, x):
        return self.classifier(self.features(x * self.mask).flatten(1))


class RegionAttention(Attention):
    """Attention in which no token may attend to a patch token outside REGION."""

    def forward(self, x):
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        blocked = torch.cat([torch.zeros(1, dtype=torch.bool), torch.as_tensor(~REGION.reshape(-1))])
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        weights = torch.softmax(logits.masked_fill(blocked, float("-inf")), dim=-1)
        if self.keep_weights:
            self.weights = weights
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


def _region_vit(x, y):
    vit = build_model("vit", dim=16, depth=2, heads=2, mlp_dim=32)
    for block in vit.blocks:
        masked = RegionAttention(16, 2)
        masked.load_state_dict(block.attn.state_dict())
        block.attn = masked
    return train_briefly(vit, x, y, epochs=2)


@pytest.fixture(scope="module")
def region_cnn(digits):
    torch.manual_seed(0)
    return train_briefly(RegionPatchCNN(), digits.train.images[:600], digits.train.labels[:600], epochs=4)


@pytest.fixture(scope="module")
def region_vit(digits):
    torch.manual_seed(0)
    return _region_vit(digits.train.images[:300], digits.train.labels[:300])


def _check_region(model, method, images, labels):
    """Per-image attributions are exactly 0 outside the region; per-digit maps lie in it."""
    frozen = prepare_model(model)
    attr = attribute(frozen, images, labels, method).abs().sum(1).numpy()  # (N, 28, 28)
    assert attr[:, ~PIXELS].max() == 0.0, f"{method}: attribution outside the region the model reads"
    assert attr[:, PIXELS].max() > 0.0, f"{method}: no attribution at all"
    maps = PerDigitMaps(frozen, method).attribute(images, labels)
    present = np.isfinite(maps).all(axis=(1, 2))
    assert present.sum() >= 5
    np.testing.assert_allclose(maps[present][:, REGION].sum(axis=1), 1.0, atol=1e-12)
    for m in maps[present]:  # the largest patch lies where the model looks
        assert REGION[np.unravel_index(np.argmax(m), m.shape)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "occlusion", "gradcam",
                                    "hirescam"])
def test_cnn_that_reads_one_region_gets_every_map_there(region_cnn, digits, method):
    x, y = digits.test.images[:60], digits.test.labels[:60]
    if method in ("gradcam", "hirescam"):  # every cell of the layer reaches the output; those outside are exactly 0
        assert gradcam_layer_name(prepare_model(region_cnn), x) == "features"  # the same map as features.2
    _check_region(region_cnn, method, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["attention", "attention_rollout", "saliency", "integrated_gradients"])
def test_vit_that_attends_to_one_region_gets_every_map_there(region_vit, digits, method):
    _check_region(region_vit, method, digits.test.images[:60], digits.test.labels[:60])


@pytest.mark.slow
def test_explain_reports_the_patches_no_class_score_depends_on(region_cnn, digits):
    x, y = digits.test.images[:80], digits.test.labels[:80]
    reach = layer_reach(prepare_model(region_cnn), None, x)  # the input itself
    np.testing.assert_array_equal(reach, PIXELS)
    out = explain_model(region_cnn, x, y.numpy(), methods=["saliency", "gradcam"], faithfulness_size=0)
    unseen = {tuple(p) for p in out["unseen_patches"]}
    assert unseen == {(int(r), int(c)) for r, c in zip(*np.nonzero(~REGION))}
    assert out["gradcam_layer"] == "features"


@pytest.mark.slow
def test_gradcam_on_a_partly_dead_layer_is_refused_and_the_default_skips_it(digits):
    """A layer whose outer ring never reaches the classifier (a 5x5 centre crop after it)."""
    x = digits.test.images[:40]

    class CroppedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
            self.classifier = nn.Linear(4 * 25, 10)

        def forward(self, x):
            return self.classifier(self.features(x)[:, :, 1:6, 1:6].flatten(1))

    model = prepare_model(CroppedHead().eval())
    reach = layer_reach(model, model.features[2], x)
    expected = np.zeros((7, 7), dtype=bool)
    expected[1:6, 1:6] = True
    np.testing.assert_array_equal(reach, expected)
    from digitlens.errors import DigitlensError

    with pytest.raises(DigitlensError, match="24 of 49 positions .* never reach the output"):
        attribute(model, x, 0, "gradcam", gradcam_layer="features.2")
    # the 3x3 conv spreads each cell over its neighbours, so the first conv's whole map is read
    assert gradcam_layer_name(model, x) in ("features.0", "features.1")
