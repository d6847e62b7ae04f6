"""Faithfulness metrics against Quantus 0.6's own metrics (same model, inputs and attributions),
against naive step-by-step loops, and against answers known by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from digitlens.data import load_splits
from digitlens.explain.faithfulness import (INK_THRESHOLD, RANDOM_LOGIT_THRESHOLD, ink_random_order, patch_order,
                                            perturbation_curves, random_logit_similarity, random_order)
from digitlens.explain.methods import attribute, prepare_model
from digitlens.explain.road import ROAD_FRACTIONS, linear_imputation, removed_counts, road_auc, road_curves
from digitlens.models import build_model


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


@pytest.fixture(scope="module")
def small_cnn(digits):
    """A CNN trained for one epoch on 600 sklearn digits (upsampled to 28x28): about a second, and
    accurate enough that ROAD's accuracies move between 0 and 1."""
    torch.manual_seed(0)
    model = build_model("cnn", widths=(4, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = digits.train.images[:600], digits.train.labels[:600]
    model.train()
    for i in range(0, 600, 32):
        loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits.test.images[:24], digits.test.labels[:24]
    assert float(x.amin()) == 0.0 and (x.reshape(24, -1).amin(1) == 0).all()  # Quantus' "black" = image minimum = 0
    return x, y


@pytest.fixture(scope="module")
def pixel_attr():
    """Tie-free attributions (float64): Quantus sorts with numpy's unstable argsort, digitlens with
    a stable one; without ties both give one order."""
    return np.random.default_rng(3).random((24, 1, 28, 28))


def _quantus():
    quantus = pytest.importorskip("quantus")
    warnings.filterwarnings("ignore", module="quantus")
    return quantus


# --- ROAD's imputation -----------------------------------------------------------------------

def _masks(rng):
    """Scattered pixels, blocks touching the border, a ring, 99 % removed, a single pixel."""
    masks = [rng.random((28, 28)) < p for p in (0.05, 0.5, 0.9, 0.99)]
    block = np.zeros((28, 28), bool)
    block[:10, 18:] = True
    block[12:20, 3:15] = True
    ring = np.zeros((28, 28), bool)
    ring[5:23, 5:23] = True
    ring[8:20, 8:20] = False
    single = np.zeros((28, 28), bool)
    single[27, 0] = True
    return np.stack(masks + [block, ring, single])


def test_linear_imputation_of_single_pixels_in_the_ink_equals_quantus(batch):
    # one masked pixel converges in one step, to a residual of exactly 0 (0 / 0 in the next step
    # gave NaN before the denominators were clamped)
    _quantus()
    from quantus.functions.perturb_func import noisy_linear_imputation

    x = batch[0][:6]
    pixels = [torch.nonzero(x[i, 0] > 0.3)[k].tolist() for i in range(6) for k in (0, 5, 9)]
    masks = torch.zeros(18, 28, 28, dtype=torch.bool)
    for row, (r, c) in enumerate(pixels):
        masks[row, r, c] = True
    images = x.repeat_interleave(3, 0)
    ours = linear_imputation(images, masks)
    assert not torch.isnan(ours).any()
    for row in range(18):
        theirs = noisy_linear_imputation(images[row].numpy(), np.flatnonzero(masks[row].numpy()), noise=0.0)
        np.testing.assert_allclose(ours[row].numpy(), theirs, rtol=0, atol=1e-6)


def test_linear_imputation_equals_quantus(batch):
    quantus = _quantus()
    from quantus.functions.perturb_func import noisy_linear_imputation

    masks = _masks(np.random.default_rng(0))
    x = batch[0][:len(masks)]
    ours = linear_imputation(x, torch.from_numpy(masks), noise=0.0)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    for i, m in enumerate(masks):
        theirs = noisy_linear_imputation(x[i].numpy(), np.flatnonzero(m), noise=0.0)
        np.testing.assert_allclose(ours[i].numpy(), theirs, rtol=0, atol=1e-6)
        assert np.array_equal(ours[i, 0].numpy()[~m], x[i, 0].numpy()[~m])  # kept pixels untouched
    assert quantus.__version__ >= "0.6"


def test_linear_imputation_reproduces_a_linear_ramp_inside_the_image():
    # the weighted mean of the 8 neighbours of a linear function is the function itself, so
    # imputing any set of interior pixels (away from the renormalised border) recovers it exactly
    i, j = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ramp = (0.01 * i + 0.02 * j + 0.1)[None, None].double()
    mask = torch.zeros(1, 28, 28, dtype=torch.bool)
    mask[0, 2:26, 2:26] = torch.rand(24, 24, generator=torch.Generator().manual_seed(0)) < 0.8
    out = linear_imputation(ramp, mask)
    # conjugate gradients stop at a residual of 1e-10; the error is at most residual / smallest
    # eigenvalue, a few 1e-8 for this large region (measured 4.8e-8)
    torch.testing.assert_close(out, ramp, rtol=0, atol=2e-7)
    assert not torch.allclose(linear_imputation(ramp, mask, tol=1e-4), ramp, rtol=0, atol=2e-7)  # tol is honoured
    # a constant image stays constant even where the border renormalises the weights
    const = torch.full((1, 1, 28, 28), 0.3, dtype=torch.float64)
    torch.testing.assert_close(linear_imputation(const, torch.ones(1, 28, 28, dtype=torch.bool) & (i > 0)),
                               const, rtol=0, atol=2e-7)


def test_linear_imputation_noise_is_seeded_and_on_removed_pixels_only(batch):
    x = batch[0][:4]
    mask = torch.zeros(4, 28, 28, dtype=torch.bool)
    mask[:, 6:22, 6:22] = True
    clean = linear_imputation(x, mask)
    noisy = linear_imputation(x, mask, noise=0.05, generator=torch.Generator().manual_seed(1))
    again = linear_imputation(x, mask, noise=0.05, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)
    diff = (noisy - clean)[:, 0]
    assert (diff[~mask] == 0).all()
    assert abs(float(diff[mask].std()) - 0.05) < 0.005 and abs(float(diff[mask].mean())) < 0.005


# --- deletion / insertion against Quantus and a naive loop -------------------------------------

@pytest.mark.slow
def test_pixel_deletion_equals_quantus_pixel_flipping(small_cnn, batch, pixel_attr):
    quantus = _quantus()
    x, y = batch
    # PixelFlipping's defaults: "black" baseline (the image minimum, 0 here), softmax, normalise by
    # the maximum (a positive scale: same order), no abs; 28 pixels per step -> 28 steps
    metric = quantus.PixelFlipping(features_in_step=28, perturb_baseline="black", abs=False, normalise=True,
                                   return_auc_per_sample=False, disable_warnings=True)
    theirs = np.asarray(metric(model=small_cnn, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=pixel_attr,
                               device="cpu", softmax=True, batch_size=24))
    ours = perturbation_curves(small_cnn, x, y, patch_order(pixel_attr[:, 0]), 28, units_per_step=28)
    assert theirs.shape == (24, 28) and ours.shape == (24, 29)
    np.testing.assert_allclose(ours[:, 1:], theirs, rtol=0, atol=1e-6)  # Quantus leaves out step 0
    assert np.ptp(theirs) > 0.1  # the curves do move


@pytest.mark.slow
def test_patch_deletion_equals_quantus_region_perturbation(small_cnn, batch, pixel_attr):
    quantus = _quantus()
    x, y = batch
    metric = quantus.RegionPerturbation(patch_size=4, order="morf", regions_evaluation=49, perturb_baseline="black",
                                        abs=False, normalise=True, disable_warnings=True)
    theirs = np.asarray(metric(model=small_cnn, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=pixel_attr,
                               device="cpu", softmax=True, batch_size=24))
    ours = perturbation_curves(small_cnn, x, y, patch_order(pixel_attr[:, 0].reshape(24, 7, 4, 7, 4).sum((2, 4))), 7)
    assert theirs.shape == (24, 49)
    # Quantus returns the drop from the unperturbed prediction, p(x) - p(x after k regions)
    np.testing.assert_allclose(ours[:, :1] - ours[:, 1:], theirs, rtol=0, atol=1e-6)


def _naive_curves(model, x, y, order, grid, mode, units_per_step):
    """One image, one step at a time: the definition, without skipping anything."""
    n, _, h, w = x.shape
    unit = (torch.arange(h)[:, None] * grid // h) * grid + torch.arange(w)[None, :] * grid // w
    n_steps = -(-grid * grid // units_per_step)
    out = np.zeros((n, n_steps + 1))
    for i in range(n):
        for k in range(n_steps + 1):
            hit = torch.isin(unit, torch.as_tensor(order[i][:k * units_per_step]))
            img = torch.where(hit, 0.0, x[i]) if mode == "deletion" else torch.where(hit, x[i], 0.0)
            with torch.no_grad():
                out[i, k] = torch.softmax(model(img[None]), 1)[0, y[i]].item()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("grid,units_per_step", [(7, 1), (7, 5), (28, 60)])
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_perturbation_curves_equal_naive_loop(small_cnn, batch, grid, units_per_step, mode):
    x, y = batch[0][:4].clone(), batch[1][:4]
    x[3] = 0.0  # an all-background image: every step is the same blank image
    order = random_order(4, grid * grid, seed=2)
    ours = perturbation_curves(small_cnn, x, y, order, grid, mode=mode, units_per_step=units_per_step, batch_size=7)
    np.testing.assert_allclose(ours, _naive_curves(small_cnn, x, y, order, grid, mode, units_per_step),
                               rtol=0, atol=1e-6)


# --- ROAD against Quantus ---------------------------------------------------------------------

def _quantus_road(quantus, model, x, y, a, percentages):
    metric = quantus.ROAD(noise=0.0, percentages=list(percentages), abs=False, normalise=True, disable_warnings=True)
    # ROAD's post-processing keeps only the first batch: one batch for all images
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, device="cpu", batch_size=len(y))
    return np.array([scores[p] for p in percentages])


@pytest.mark.slow
def test_pixel_road_equals_quantus(small_cnn, batch, pixel_attr):
    quantus = _quantus()
    x, y = batch
    percentages = [0, 5, 20, 35, 50, 65, 80, 95]
    order = patch_order(pixel_attr[:, 0])
    for mode, a in (("morf", pixel_attr), ("lerf", pixel_attr.max() - pixel_attr)):  # Quantus' ROAD is MoRF only
        theirs = _quantus_road(quantus, small_cnn, x, y, a, percentages)
        ours = road_curves(small_cnn, x, y, order, grid=28, mode=mode, fractions=np.array(percentages) / 100,
                           noise=0.0, measure="accuracy")
        assert ours.shape == (24, len(percentages))
        np.testing.assert_allclose(ours.mean(0), theirs, rtol=0, atol=1e-6)
        assert len(set(theirs)) > 2  # the accuracies do change


@pytest.mark.slow
def test_patch_road_equals_quantus_on_patch_constant_attributions(small_cnn, batch, pixel_attr):
    quantus = _quantus()
    x, y = batch
    patch_scores = pixel_attr[:, 0].reshape(24, 7, 4, 7, 4).sum((2, 4))
    a = np.kron(patch_scores, np.ones((4, 4)))[:, None]  # every pixel carries its patch's score
    removed = [0, 3, 10, 20, 30, 40, 46]  # patches; Quantus removes int(784 * p / 100) = 16 * k pixels
    percentages = [k * 100 / 49 + 1e-7 for k in removed]
    theirs = _quantus_road(quantus, small_cnn, x, y, a, percentages)
    ours = road_curves(small_cnn, x, y, patch_order(patch_scores), grid=7, fractions=np.array(removed) / 49,
                       noise=0.0, measure="accuracy")
    np.testing.assert_allclose(ours.mean(0), theirs, rtol=0, atol=1e-6)


# --- ROAD on its own --------------------------------------------------------------------------

@pytest.mark.slow
def test_road_probability_is_the_model_on_imputed_images(small_cnn, batch):
    x, y = batch[0][:6], batch[1][:6]
    order = random_order(6, 49, seed=0)
    fractions = (0.0, 0.25, 0.5)
    ours = road_curves(small_cnn, x, y, order, grid=7, fractions=fractions, noise=0.0)
    rank = np.argsort(order, axis=1).reshape(6, 7, 7).repeat(4, 1).repeat(4, 2)  # patch position per pixel
    for j, k in enumerate(removed_counts(49, fractions)):
        imputed = linear_imputation(x, torch.from_numpy(rank < k))
        with torch.no_grad():
            expected = torch.softmax(small_cnn(imputed), 1)[torch.arange(6), y].numpy()
        np.testing.assert_allclose(ours[:, j], expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # no fraction removed: the model's own probability
        np.testing.assert_allclose(ours[:, 0], torch.softmax(small_cnn(x), 1)[torch.arange(6), y].numpy(), atol=1e-6)


@pytest.mark.slow
def test_road_lerf_is_morf_of_reversed_order_and_seeded(small_cnn, batch):
    x, y = batch[0][:8], batch[1][:8]
    order = random_order(8, 49, seed=5)
    lerf = road_curves(small_cnn, x, y, order, grid=7, mode="lerf", seed=3, batch_size=13)
    morf_rev = road_curves(small_cnn, x, y, order[:, ::-1], grid=7, mode="morf", seed=3, batch_size=40)
    np.testing.assert_allclose(lerf, morf_rev, rtol=0, atol=1e-6)  # noise drawn per image: batch_size does not matter
    other_seed = road_curves(small_cnn, x, y, order[:, ::-1], grid=7, mode="morf", seed=4)
    assert np.abs(other_seed - morf_rev).max() > 1e-6
    assert lerf.shape == (8, len(ROAD_FRACTIONS))
    assert road_auc(np.ones((3, 10))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="morf or lerf"):
        road_curves(small_cnn, x, y, order, grid=7, mode="deletion")


# --- the ink-only random order ----------------------------------------------------------------

@pytest.mark.parametrize("grid", [7, 28])
def test_ink_random_order_puts_every_ink_unit_first(batch, grid):
    x = batch[0][:10]
    order = ink_random_order(x, grid, seed=0)
    size = 28 // grid
    ink = (x[:, 0] > INK_THRESHOLD).reshape(10, grid, size, grid, size).any(4).any(2).reshape(10, -1).numpy()
    assert order.shape == (10, grid * grid)
    for i in range(10):
        assert sorted(order[i]) == list(range(grid * grid))  # a permutation
        k = int(ink[i].sum())
        assert 0 < k < grid * grid
        assert ink[i][order[i][:k]].all() and not ink[i][order[i][k:]].any()
    np.testing.assert_array_equal(order, ink_random_order(x, grid, seed=0))
    assert not np.array_equal(order, ink_random_order(x, grid, seed=1))
    # random within the ink: not simply the patch indices in increasing order
    assert any(not np.all(np.diff(order[i][:int(ink[i].sum())]) > 0) for i in range(10))


# --- the random-logit check -------------------------------------------------------------------

def test_random_logit_similarity_is_one_for_a_map_that_ignores_the_class(batch):
    x, y = batch[0][:8], batch[1][:8]
    asked = []

    def input_itself(images, targets):
        asked.append(np.asarray(targets))
        return images[:, 0]

    sim = random_logit_similarity(input_itself, x, y, n_classes=10, seed=0)
    np.testing.assert_allclose(sim, 1.0)
    assert sim.mean() > RANDOM_LOGIT_THRESHOLD
    true_t, other = asked
    np.testing.assert_array_equal(true_t, y.numpy())
    assert (other != true_t).all() and ((0 <= other) & (other < 10)).all()


def test_random_logit_similarity_is_low_when_classes_use_different_pixels(batch):
    # a linear model whose class c weighs only its own band of rows: saliency |W_c| differs per class
    torch.manual_seed(0)
    lin = nn.Linear(28 * 28, 10, bias=False)
    with torch.no_grad():
        w = torch.zeros(10, 28, 28)
        for c in range(10):
            w[c, 2 * c:2 * c + 4] = torch.rand(4, 28) + 0.5
        lin.weight.copy_(w.reshape(10, -1))
    model = prepare_model(nn.Sequential(nn.Flatten(), lin))
    x, y = batch[0][:8], batch[1][:8]

    def saliency(images, targets):
        return attribute(model, images, targets, "saliency")[:, 0]

    sim = random_logit_similarity(saliency, x, y, n_classes=10, seed=0)
    assert sim.shape == (8,)
    assert sim.mean() < 0.5 < RANDOM_LOGIT_THRESHOLD


def test_patch_order_breaks_ties_at_random_when_seeded():
    from digitlens.explain.faithfulness import patch_order

    scores = np.zeros((200, 7, 7))
    scores[:, 3, 3] = 1.0  # one relevant patch, the rest tied
    stable, seeded = patch_order(scores), patch_order(scores, seed=0)
    assert (stable[:, 0] == 24).all() and (seeded[:, 0] == 24).all()
    np.testing.assert_array_equal(stable[:, 1], 0)  # stable: ties removed top-left first
    assert len(set(seeded[:, 1].tolist())) > 20  # seeded: any tied patch may come next
    np.testing.assert_array_equal(np.sort(seeded, axis=1), np.tile(np.arange(49), (200, 1)))
    np.testing.assert_array_equal(seeded, patch_order(scores, seed=0))
