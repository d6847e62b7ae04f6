"""Explanations against oracles: Captum called directly, a linear model, hand-written formulas."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from captum.attr import (InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion,
                         Saliency)
from scipy.stats import spearmanr
from torch import nn

from digitlens.data import load_splits
from digitlens.errors import DigitlensError
from digitlens.explain.aggregate import PerDigitMaps
from digitlens.explain.faithfulness import cascading_randomisation, curve_auc, patch_order, perturbation_curves, random_order, spearman_rows
from digitlens.explain.maps import pool_to_grid
from digitlens.explain.methods import attention_rollout, attribute, class_token_attention, prepare_model
from digitlens.explain.run import explain_model
from digitlens.explain.faithfulness import randomisation_units
from digitlens.explain.methods import gradcam_layer_name, layer_reach
from digitlens.models import build_model
from training import train_briefly


_train = train_briefly


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


@pytest.fixture(scope="module")
def tiny_cnn(digits):
    torch.manual_seed(0)
    return _train(build_model("cnn", widths=(4, 8, 8)), digits.train.images[:600], digits.train.labels[:600])


@pytest.fixture(scope="module")
def batch(digits):
    return digits.test.images[:40], digits.test.labels[:40]


def _linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()


# --- equal to Captum called directly ---------------------------------------------------------

@pytest.mark.slow
def test_saliency_and_input_x_gradient_equal_captum(tiny_cnn, batch):
    x, y = batch
    frozen = prepare_model(tiny_cnn)
    ours = attribute(frozen, x, y, "saliency")
    theirs = Saliency(tiny_cnn).attribute(x.clone().requires_grad_(), target=y)
    torch.testing.assert_close(ours, theirs)
    ours = attribute(frozen, x, y, "input_x_gradient")
    theirs = InputXGradient(tiny_cnn).attribute(x.clone().requires_grad_(), target=y)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_integrated_gradients_fixed_steps_equal_captum(tiny_cnn, batch):
    x, y = batch
    ours = attribute(prepare_model(tiny_cnn), x, y, "integrated_gradients", n_steps=20)
    theirs = IntegratedGradients(tiny_cnn).attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=20)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_occlusion_equal_captum(tiny_cnn, batch):
    x, y = batch[0][:4], batch[1][:4]
    ours = attribute(prepare_model(tiny_cnn), x, y, "occlusion")
    theirs = Occlusion(tiny_cnn).attribute(x, sliding_window_shapes=(1, 4, 4), strides=(1, 4, 4), baselines=0.0,
                                           target=y)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradcam_equal_captum_on_last_conv_block_with_patch_aligned_upsampling(tiny_cnn, batch):
    x, y = batch
    frozen = prepare_model(tiny_cnn)
    assert gradcam_layer_name(frozen, x) == "features.3"  # the last conv block: conv, batch norm, ReLU
    ours = attribute(frozen, x, y, "gradcam")
    cam = LayerGradCam(tiny_cnn, tiny_cnn.features[3]).attribute(x.clone().requires_grad_(), target=y,
                                                                 relu_attributions=True)
    theirs = LayerAttribution.interpolate(cam.detach(), (28, 28), interpolate_mode="nearest")
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # each cell of the 7x7 map covers exactly one 4x4 patch: pooling back gives the layer's map
    torch.testing.assert_close(torch.as_tensor(pool_to_grid(ours[:, 0].numpy(), 7) / 16, dtype=torch.float32),
                               cam.detach()[:, 0], rtol=1e-4, atol=1e-6)
    # a named layer is honoured
    named = attribute(frozen, x, y, "gradcam", gradcam_layer="features.0.0")
    assert not torch.allclose(named, ours)


@pytest.mark.slow
def test_hirescam_equals_captum_and_splits_the_class_score_over_the_map_exactly(tiny_cnn, batch):
    from captum.attr import LayerGradientXActivation

    x, y = batch
    ours = attribute(prepare_model(tiny_cnn), x, y, "hirescam")
    gxa = LayerGradientXActivation(tiny_cnn, tiny_cnn.features[3]).attribute(x.clone().requires_grad_(), target=y)
    theirs = LayerAttribution.interpolate(gxa.detach().sum(1, keepdim=True).clamp_min(0), (28, 28),
                                          interpolate_mode="nearest")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # Draelos & Carin's point: with a linear layer after the (max-pooled) map, the unclipped
    # gradient x activation summed over positions is the class score minus its bias, exactly.
    with torch.no_grad():
        score = tiny_cnn(x).gather(1, y[:, None])[:, 0] - tiny_cnn.classifier.bias[y]
    torch.testing.assert_close(gxa.detach().sum(dim=(1, 2, 3)), score, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradcam_refuses_a_layer_whose_map_is_partly_cut_off_and_defaults_to_a_whole_one(batch):
    x, y = batch
    legacy = prepare_model(build_model("cnn", widths=(4, 8, 8), pool_ceil=False))  # floor pool: 7x7 -> 3x3
    reach = layer_reach(legacy, legacy.features[3], x)
    assert reach.shape == (7, 7) and not reach[6].any() and not reach[:, 6].any() and reach[:6, :6].all()
    with pytest.raises(DigitlensError, match=r"--gradcam-layer 'features.3': 13 of 49 positions \(row 6 and column 6\)"):
        attribute(legacy, x, y, "gradcam", gradcam_layer="features.3")
    assert gradcam_layer_name(legacy, x) == "features.1"  # the 14x14 map: every position is read
    current = prepare_model(build_model("cnn", widths=(4, 8, 8)))
    assert layer_reach(current, current.features[3], x).all()


# --- a model whose right answer is known by hand ---------------------------------------------

def test_linear_model_saliency_is_abs_weights_and_ixg_is_x_times_w():
    model = _linear_model()
    x = torch.rand(6, 1, 28, 28)
    target = torch.tensor([0, 1, 2, 3, 4, 9])
    w = model[1].weight.detach()[target].reshape(6, 1, 28, 28)
    torch.testing.assert_close(attribute(prepare_model(model), x, target, "saliency"), w.abs())
    torch.testing.assert_close(attribute(prepare_model(model), x, target, "input_x_gradient"), x * w)
    # integrated gradients from a black image is exactly x * w for a linear model
    torch.testing.assert_close(attribute(prepare_model(model), x, target, "integrated_gradients"), x * w,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_adaptive_integrated_gradients_meets_completeness_tolerance(tiny_cnn, batch):
    from digitlens.explain.methods import IGInfo

    class CountingGradients(torch.nn.Module):  # counts the input rows whose gradient is taken
        def __init__(self, inner):
            super().__init__()
            self.inner, self.rows = inner, 0

        def forward(self, inputs):
            if torch.is_grad_enabled() and inputs.requires_grad:
                self.rows += inputs.shape[0]
            return self.inner(inputs)

    x, y = batch[0][:12], batch[1][:12]
    frozen = prepare_model(tiny_cnn)
    counting = CountingGradients(frozen)
    info = IGInfo()
    attr = attribute(counting, x, y, "integrated_gradients", tolerance=0.01, max_steps=512, ig_info=info)
    with torch.no_grad():
        gap = (frozen(x) - frozen(torch.zeros_like(x))).gather(1, y[:, None])[:, 0]
    rel = (attr.sum(dim=(1, 2, 3)) - gap).abs() / gap.abs().clamp_min(1e-3)
    assert len(info.steps) == len(x)
    assert set(info.steps) <= {9, 17, 33, 65, 129, 257}  # nested Clenshaw-Curtis rules up to max_steps=512
    converged = np.asarray(info.steps) < 257
    assert (rel.numpy()[converged] <= 0.01 + 1e-6).all()
    np.testing.assert_allclose(np.asarray(info.rel_error), rel.numpy(), rtol=1e-3, atol=1e-5)
    assert len(set(info.steps)) > 1  # the number of steps is chosen per image
    # The gradients counted where the model ran (an independent count) are the ones reported...
    assert sum(info.evaluated_steps) == counting.rows
    # ...and, the rules being nested, each image needed no more gradients than the points its rule uses.
    assert info.evaluated_steps == info.steps


def test_clenshaw_curtis_integrates_polynomials_exactly_and_is_nested():
    from digitlens.explain.methods import clenshaw_curtis

    for n in (2, 8, 16, 64):
        alphas, weights = map(np.asarray, clenshaw_curtis(n))
        assert alphas[0] == 0.0 and alphas[-1] == 1.0 and (np.diff(alphas) > 0).all()
        for degree in range(n + 1):  # oracle: the integral of t**degree over [0, 1] is 1 / (degree + 1)
            assert abs(weights @ alphas ** degree - 1 / (degree + 1)) < 1e-12, (n, degree)
        finer = np.asarray(clenshaw_curtis(2 * n)[0])
        np.testing.assert_allclose(finer[::2], alphas, atol=1e-15)
    with pytest.raises(DigitlensError, match="even"):
        clenshaw_curtis(7)


@pytest.mark.slow
def test_adaptive_integrated_gradients_converge_to_captum_with_many_steps(tiny_cnn, batch):
    x, y = batch[0][:10], batch[1][:10]
    ours = attribute(prepare_model(tiny_cnn), x, y, "integrated_gradients", tolerance=0.0, max_steps=513)
    theirs = IntegratedGradients(tiny_cnn).attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=512)
    rel_l1 = (ours - theirs).abs().sum(dim=(1, 2, 3)) / theirs.abs().sum(dim=(1, 2, 3))
    assert rel_l1.max() < 0.02, rel_l1  # measured 0.0099: both rules are about 0.5% off the integral at 512 points
    # and the coarsest rule is visibly further away: the test can tell a good rule from a bad one
    coarse = attribute(prepare_model(tiny_cnn), x, y, "integrated_gradients", tolerance=0.0, max_steps=9)
    assert ((coarse - theirs).abs().sum(dim=(1, 2, 3)) / theirs.abs().sum(dim=(1, 2, 3))).mean() > 5 * rel_l1.mean()


# --- per-digit maps --------------------------------------------------------------------------

@pytest.mark.slow
def test_per_digit_maps_sum_to_one_and_match_naive_formula(tiny_cnn, digits):
    x, y = digits.test.images[:120], digits.test.labels[:120]
    maps = PerDigitMaps(tiny_cnn, "saliency").attribute(x, y, batch_size=120)
    assert maps.shape == (10, 7, 7)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0)
    per_image = Saliency(tiny_cnn).attribute(x.clone().requires_grad_(), target=y).abs().sum(1).numpy()
    for digit in range(10):
        mean = per_image[y.numpy() == digit].mean(axis=0)
        pooled = mean.reshape(7, 4, 7, 4).sum(axis=(1, 3))
        np.testing.assert_allclose(maps[digit], pooled / pooled.sum(), rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_streaming_in_batches_equals_all_at_once(tiny_cnn, digits):
    x, y = digits.test.images[:40], digits.test.labels[:40]
    for method in ("saliency", "gradcam"):
        once = PerDigitMaps(tiny_cnn, method, grid=4).attribute(x, y, batch_size=40)
        streamed = PerDigitMaps(tiny_cnn, method, grid=4).attribute(x, y, batch_size=7)
        np.testing.assert_allclose(streamed, once, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_group_by_predicted_and_correct_counts(tiny_cnn, digits):
    x, y = digits.test.images[:100], digits.test.labels[:100]
    pred = tiny_cnn(x).argmax(1).numpy()
    agg = PerDigitMaps(tiny_cnn, "saliency", group_by="predicted")
    agg.attribute(x, y)
    np.testing.assert_array_equal(agg.counts_, np.bincount(pred, minlength=10))
    agg = PerDigitMaps(tiny_cnn, "saliency", group_by="correct")
    maps = agg.attribute(x, y)
    assert maps.shape == (2, 7, 7) and agg.group_names == ["incorrect", "correct"]
    n_correct = int((pred == y.numpy()).sum())
    np.testing.assert_array_equal(agg.counts_, [100 - n_correct, n_correct])


def test_pool_to_grid_sums_patches_and_rejects_bad_grid():
    maps = np.arange(2 * 28 * 28, dtype=float).reshape(2, 28, 28)
    np.testing.assert_allclose(pool_to_grid(maps, 7), maps.reshape(2, 7, 4, 7, 4).sum(axis=(2, 4)))
    with pytest.raises(DigitlensError, match="--grid"):
        pool_to_grid(maps, 0)


@pytest.mark.slow
def test_bad_method_and_group_by_raise_one_line_errors(tiny_cnn):
    with pytest.raises(DigitlensError, match="unknown method"):
        PerDigitMaps(tiny_cnn, "lime")
    with pytest.raises(DigitlensError, match="transformer"):
        PerDigitMaps(tiny_cnn, "attention")
    with pytest.raises(DigitlensError, match="--group-by"):
        PerDigitMaps(tiny_cnn, "saliency", group_by="colour")


# --- ViT attention ---------------------------------------------------------------------------

def test_rollout_on_hand_made_attention_stack_equals_formula():
    rng = np.random.default_rng(0)
    mats = []
    for _ in range(3):
        a = rng.random((2, 5, 5))
        mats.append(a / a.sum(-1, keepdims=True))
    expected = np.stack([np.eye(5)] * 2)
    for a in mats:  # naive formula, one image at a time
        a_hat = 0.5 * a + 0.5 * np.eye(5)
        a_hat = a_hat / a_hat.sum(-1, keepdims=True)
        expected = np.stack([a_hat[i] @ expected[i] for i in range(2)])
    got = attention_rollout([torch.tensor(a) for a in mats]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_allclose(got.sum(-1), 1.0)


class _FixedAttention(nn.Module):
    """Returns a given attention stack (N, heads, 1+4, 1+4) per block: a 2x2 patch grid."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x, return_attention=False):
        logits = torch.zeros(x.shape[0], 10)
        return (logits, self.stack) if return_attention else logits


def test_class_token_attention_maps_follow_the_formula():
    torch.manual_seed(0)
    stack = [torch.softmax(torch.randn(3, 2, 5, 5), -1) for _ in range(2)]
    model = _FixedAttention(stack)
    x = torch.zeros(3, 1, 8, 8)
    last = class_token_attention(model, x)
    expected = stack[-1].mean(1)[:, 0, 1:].reshape(3, 1, 2, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(last, expected)
    rolled = class_token_attention(model, x, rollout=True)
    expected = attention_rollout([a.mean(1) for a in stack])[:, 0, 1:].reshape(3, 1, 2, 2)
    torch.testing.assert_close(rolled, expected.repeat_interleave(4, 2).repeat_interleave(4, 3))


@pytest.mark.slow
def test_vit_attention_methods_run_per_digit():
    torch.manual_seed(0)
    vit = build_model("vit", dim=16, depth=2, heads=2, mlp_dim=32).eval()
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 10
    for method in ("attention", "attention_rollout"):
        maps = PerDigitMaps(vit, method).attribute(x, y, batch_size=5)
        assert maps.shape == (10, 7, 7)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0)


# --- faithfulness ----------------------------------------------------------------------------

@pytest.mark.slow
def test_deletion_of_oracle_order_is_below_random_for_known_model():
    # two classes: logit_0 = w . x, logit_1 = 0, so p_0 = sigmoid(w . x); removing the patches with
    # the largest contribution w * x first is the best possible deletion order.
    torch.manual_seed(0)
    lin = nn.Linear(28 * 28, 2, bias=False)
    with torch.no_grad():
        lin.weight[0] = torch.randn(28 * 28) * 0.05
        lin.weight[1] = 0.0
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.rand(8, 1, 28, 28)
    contribution = (x[:, 0] * lin.weight[0].reshape(28, 28)).detach().numpy()
    oracle = patch_order(pool_to_grid(contribution, 7))
    rand = random_order(8, 49, seed=1)
    target = torch.zeros(8, dtype=torch.long)
    del_oracle = perturbation_curves(model, x, target, oracle, 7, mode="deletion")
    del_random = perturbation_curves(model, x, target, rand, 7, mode="deletion")
    assert del_oracle.shape == (8, 50)
    assert (del_oracle <= del_random + 1e-9).all()
    assert curve_auc(del_oracle) < curve_auc(del_random)
    ins_oracle = perturbation_curves(model, x, target, oracle, 7, mode="insertion")
    ins_random = perturbation_curves(model, x, target, rand, 7, mode="insertion")
    assert curve_auc(ins_oracle) > curve_auc(ins_random)
    # both curves start / end at the full image and the black image
    np.testing.assert_allclose(del_oracle[:, 0], ins_oracle[:, -1], rtol=1e-6)
    np.testing.assert_allclose(del_oracle[:, -1], 0.5, rtol=1e-6)


def test_curve_auc_is_trapezoid_area():
    curves = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    assert curve_auc(curves) == pytest.approx((0.5 + 1.0) / 2)


def test_spearman_rows_equal_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 30)), rng.random((4, 30))
    b[0] = a[0] * 2  # perfect rank agreement
    a[1, :10] = 0.0  # ties
    expected = [spearmanr(a[i], b[i])[0] for i in range(4)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, rtol=1e-10)


@pytest.mark.slow
def test_cascading_randomisation_top_down(tiny_cnn, batch):
    x, y = batch[0][:16], batch[1][:16]
    names = [u[0] for u in randomisation_units(tiny_cnn)]
    assert names == ["classifier", "features.3", "features.1", "features.0"]
    vit_names = [u[0] for u in randomisation_units(build_model("vit", dim=16, depth=2, heads=2, mlp_dim=32))]
    assert vit_names == ["head", "norm", "blocks.1", "blocks.0", "patch_embed", "embeddings"]

    def map_fn(m):
        return {"input": x[:, 0].reshape(16, -1).numpy(),
                "saliency": attribute(m, x, y, "saliency").reshape(16, -1).numpy()}

    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    stages = cascading_randomisation(prepare_model(tiny_cnn), map_fn)
    assert [s[0] for s in stages] == names
    for _, corr in stages:  # a "method" that ignores the model never changes
        np.testing.assert_allclose(corr["input"], 1.0)
    assert stages[-1][1]["saliency"].mean() < 0.9
    after = tiny_cnn.state_dict()  # the trained model itself is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_explain_model_faithfulness_ranks_and_beats_random(tiny_cnn, digits):
    x, y = digits.test.images[:40], digits.test.labels[:40]
    out = explain_model(tiny_cnn, x, y.numpy(), methods=["saliency", "gradcam"], faithfulness_size=20,
                        sanity_size=6, batch_size=25)
    f = out["faithfulness"]
    assert f["n_images"] == 20 and sorted(f["ranking"]) == ["gradcam", "saliency"]
    assert set(f["methods"]) == {"saliency", "gradcam", "random", "ink_random"}
    assert f["methods"]["random"]["deletion_auc"] > min(f["methods"][m]["deletion_auc"] for m in ("saliency", "gradcam"))
    assert len(f["randomisation"]["spearman"]["saliency"]) == len(f["randomisation"]["layers"])
    np.testing.assert_array_equal(out["counts"], np.bincount(y.numpy(), minlength=10))
    for m in ("saliency", "gradcam"):
        row = f["methods"][m]
        assert row["road_score"] == pytest.approx(row["road_lerf_auc"] - row["road_morf_auc"])
        assert row["eligible"] == (row["passes_sanity_check"] and row["passes_random_logit"])
        assert row["beats_ink_random"] == (row["road_morf_auc"] < f["methods"]["ink_random"]["road_morf_auc"])
        assert row["eligible"] == (not row["reasons"])
    # the verdict only names a method that passes every check, and ranks it first
    best = f["most_faithful"]
    assert best is None or (f["ranking"][0] == best and f["methods"][best]["eligible"])
    assert out["gradcam_layer"] == "features.3" and out["unseen_patches"] == []


def test_verdict_never_names_a_method_that_fails_a_check():
    from digitlens.explain.verdict import rank_methods

    def row(score, sanity=True, logit=True, ink=True):
        return {"road_score": score, "passes_sanity_check": sanity, "spearman_fully_randomised": 0.1 if sanity else 0.99,
                "passes_random_logit": logit, "random_logit_spearman": 0.3 if logit else 0.97, "beats_ink_random": ink}

    rows = {"integrated_gradients": row(0.6, sanity=False), "saliency": row(0.2), "gradcam": row(0.3),
            "attention": row(0.5, logit=False), "random": {"road_score": 0.0}}
    v = rank_methods(rows)
    assert v["most_faithful"] == "gradcam"
    assert v["ranking"] == ["gradcam", "saliency", "integrated_gradients", "attention"]
    assert "follow the input's ink, not what the model learned" in rows["integrated_gradients"]["reasons"][0]
    assert "0.99" in rows["integrated_gradients"]["reasons"][0]
    assert "does not explain the class" in rows["attention"]["reasons"][0]
    assert rows["gradcam"]["rank"] == 1 and rows["integrated_gradients"]["rank"] == 3
    assert "removing ink" not in v["verdict"]
    v = rank_methods({"saliency": row(0.2, ink=False)})  # eligible, with the caveat said
    assert v["most_faithful"] == "saliency" and "no better than the ink does" in v["verdict"]
    v = rank_methods({"saliency": row(0.2, sanity=False), "attention": row(0.4, logit=False)})
    assert v["most_faithful"] is None and "none is called most faithful" in v["verdict"]


# --- the run folder and the command line -----------------------------------------------------

def _write_run(path, model, name, model_kwargs):
    from digitlens.models import save_model
    from digitlens.runio import write_json
    path.mkdir(parents=True)
    pinned = {**model_kwargs, "pool_ceil": True} if name == "cnn" else model_kwargs  # as train() pins it
    write_json(path / "config.json", {"dataset": "digits", "model": name, "model_kwargs": pinned,
                                      "n_classes": 10, "seed": 0, "val_fraction": 0.1, "data_dir": None, "epochs": 1})
    save_model(model, path / "model.safetensors")
    return path


@pytest.mark.slow
def test_explain_run_writes_maps_manifest_metrics_and_figures(tiny_cnn, tmp_path):
    from digitlens.explain.maps import load_maps
    from digitlens.explain.run import explain_run
    from digitlens.figure_writer import read_figure_manifest
    from digitlens.runio import read_json

    run = _write_run(tmp_path / "cnn", tiny_cnn, "cnn", {"widths": [4, 8, 8]})
    summary = explain_run(run, methods="saliency,gradcam", progress=False, faithfulness_size=20, sanity_size=4,
                          split="val")
    explain = run / "explain"
    manifest = read_json(explain / "manifest.json")
    assert manifest["methods"] == ["saliency", "gradcam"] and manifest["n_images"] == 135
    assert sum(manifest["counts"]) == 135
    maps = load_maps(run, "gradcam")
    assert maps["maps"].shape == (10, 7, 7) and maps["pixel_maps"].shape == (10, 28, 28)
    np.testing.assert_allclose(maps["maps"].sum(axis=(1, 2)), 1.0)
    metrics = read_json(explain / "explain_metrics.json")
    assert metrics["faithfulness"]["n_images"] == 20 and metrics["faithfulness"]["sanity_n_images"] == 4
    for fig in ("per_digit_saliency", "per_digit_gradcam", "overlays_predictions", "filters_first_layer",
                "feature_maps", "faithfulness"):
        assert (explain / "figures" / f"{fig}.png").stat().st_size > 1000, fig
        assert f"{fig}.png" in summary["files"]["figures"]
    # every figure is listed in explain/figures.json (paths relative to explain/), saying what it shows
    entries = read_figure_manifest(explain)
    assert sorted(e["path"].name for e in entries) == sorted(summary["files"]["figures"])
    assert all(e["path"].parent == (explain / "figures").resolve() and e["title"] for e in entries)
    assert all(e["files"] == [f"figures/{e['path'].stem}.png", f"figures/{e['path'].stem}.svg"] for e in entries)
    by_name = {e["path"].stem: e for e in entries}
    assert {k: by_name["per_digit_gradcam"][k] for k in ("kind", "section", "method", "group_by", "split", "run")} == \
        {"kind": "heatmap", "section": "explanations", "method": "gradcam", "group_by": "true", "split": "val", "run": "cnn"}
    assert (by_name["faithfulness"]["kind"], by_name["faithfulness"]["methods"]) == ("faithfulness", ["saliency", "gradcam"])
    assert (by_name["overlays_predictions"]["kind"], by_name["overlays_predictions"]["section"]) == ("overlay", "galleries")
    assert by_name["overlays_predictions"]["method"] == "saliency"
    assert (by_name["filters_first_layer"]["kind"], by_name["filters_first_layer"]["section"]) == ("filters", "filters")
    assert read_json(explain / "figures.json")["stage"] == "explain"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # the staged folder was swapped in whole


@pytest.mark.slow
def test_explain_command_and_one_line_errors(tiny_cnn, tmp_path):
    from typer.testing import CliRunner

    from digitlens.cli import app

    torch.manual_seed(1)
    vit = build_model("vit", dim=16, depth=1, heads=2, mlp_dim=16).eval()
    run_a = _write_run(tmp_path / "a", vit, "vit", {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16})
    run_b = _write_run(tmp_path / "b", tiny_cnn, "cnn", {"widths": [4, 8, 8]})
    runner = CliRunner()
    result = runner.invoke(app, ["explain", str(run_a), "--methods", "saliency,attention_rollout", "--compare",
                                 str(run_b), "--faithfulness-size", "0", "--no-progress", "--split", "val"])
    assert result.exit_code == 0, result.output
    figures = run_a / "explain" / "figures"
    assert (figures / "per_digit_attention_rollout.png").is_file()
    assert (figures / "compare_saliency_a_vs_b.png").is_file()  # only methods that apply to both runs
    assert not (run_a / "explain" / "explain_metrics.json").read_text().count("faithfulness")
    # the CLI's dash spelling of a method name works as well as the underscore one
    result = runner.invoke(app, ["explain", str(run_b), "--methods", "integrated-gradients", "--ig-steps", "16",
                                 "--faithfulness-size", "0", "--no-progress", "--split", "val"])
    assert result.exit_code == 0, result.output
    ig = json.loads((run_b / "explain" / "explain_metrics.json").read_text())["integrated_gradients"]
    assert ig["n_steps"] == 16 and ig["mean_steps"] == ig["max_steps"] == 16
    result = runner.invoke(app, ["explain", str(run_b), "--methods", "integrated_gradients", "--ig-tolerance", "0.5",
                                 "--faithfulness-size", "0", "--no-progress", "--split", "val"])
    ig = json.loads((run_b / "explain" / "explain_metrics.json").read_text())["integrated_gradients"]
    assert result.exit_code == 0 and ig["tolerance"] == 0.5 and ig["n_steps"] == "adaptive"
    assert ig["fraction_above_tolerance"] < 0.05 and ig["mean_steps"] < 17  # a loose tolerance: mostly 9 points
    result = runner.invoke(app, ["explain", str(run_b), "--ig-tolerance", "-1"])
    assert result.exit_code == 2 and "--ig-tolerance" in result.output
    result = runner.invoke(app, ["explain", str(run_b), "--methods", "attention"])
    assert result.exit_code == 2
    assert "error: --methods 'attention': needs a transformer" in result.output
    result = runner.invoke(app, ["explain", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "run folder not found" in result.output


@pytest.mark.slow
def test_comparison_display_shares_colour_scale_and_draws_difference():
    from digitlens.plots.heatmaps import PerDigitMapsComparisonDisplay

    rng = np.random.default_rng(0)
    a = rng.random((10, 7, 7))
    b = rng.random((10, 7, 7)) * 3
    disp = PerDigitMapsComparisonDisplay(maps_a=a, maps_b=b, name_a="cnn", name_b="vit").plot()
    im_a, im_b, im_d = (axes[0, 0].images[0] for axes in (disp.axes_a_, disp.axes_b_, disp.axes_diff_))
    assert im_a.get_clim() == im_b.get_clim() == (0.0, b.max())
    lo, hi = im_d.get_clim()
    assert lo == -hi and hi == pytest.approx(np.abs(a - b).max())
    np.testing.assert_allclose(np.asarray(im_d.get_array()), a[0] - b[0])
    with pytest.raises(DigitlensError, match="maps_b"):
        PerDigitMapsComparisonDisplay(maps_a=a, maps_b=b[:, :5, :5])


@pytest.mark.slow
def test_comparison_reuses_maps_saved_in_the_other_run(tiny_cnn, tmp_path, monkeypatch):
    from digitlens.explain.maps import load_maps
    from digitlens.explain.run import explain_run
    from digitlens.explain import run as explain_run_module
    from digitlens.explain.maps import saved_maps
    from digitlens.figure_writer import read_figure_manifest
    from digitlens.runio import read_json

    run_b = _write_run(tmp_path / "b", tiny_cnn, "cnn", {"widths": [4, 8, 8]})
    explain_run(run_b, methods="saliency", split="val", faithfulness_size=0, figures=False, progress=False)
    saved = load_maps(run_b, "saliency")["maps"]
    result = {"group_by": "true", "grid": 7, "n_images": int(read_json(run_b / "explain" / "manifest.json")["n_images"])}
    reused = saved_maps(run_b, ["saliency", "gradcam"], result, "val")
    assert list(reused) == ["saliency"]  # gradcam was not explained in run b
    np.testing.assert_array_equal(reused["saliency"], saved)
    assert saved_maps(run_b, ["saliency"], result, "test") == {}  # another split
    assert saved_maps(run_b, ["saliency"], dict(result, grid=4), "val") == {}

    # explain_run --compare takes those maps instead of explaining run b again
    torch.manual_seed(1)
    cnn_a = build_model("cnn", widths=(4, 8, 8)).eval()
    run_a = _write_run(tmp_path / "a", cnn_a, "cnn", {"widths": [4, 8, 8]})
    calls = []
    original = explain_run_module.explain_model
    monkeypatch.setattr(explain_run_module, "explain_model", lambda *a, **k: calls.append(k["methods"]) or original(*a, **k))
    explain_run(run_a, methods="saliency", split="val", faithfulness_size=0, progress=False, compare=run_b)
    assert calls == ["saliency"]  # run a only
    assert (run_a / "explain" / "figures" / "compare_saliency_a_vs_b.png").is_file()
    compared = [e for e in read_figure_manifest(run_a / "explain") if e["kind"] == "heatmap_compare"]
    assert [(e["path"].name, e["method"], e["runs"], e["section"]) for e in compared] == \
        [("compare_saliency_a_vs_b.png", "saliency", ["a", "b"], "explanations")]


@pytest.mark.slow
def test_fold_batch_norm_keeps_the_function_and_its_input_gradients(tiny_cnn, digits):
    from digitlens.explain.methods import fold_batch_norm

    frozen = prepare_model(tiny_cnn)
    folded = fold_batch_norm(frozen)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in frozen.modules()) == 3  # the original is untouched
    assert all(not p.requires_grad for p in folded.parameters())
    x, y = digits.test.images[:16], digits.test.labels[:16]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), frozen(x), atol=1e-5, rtol=1e-5)
    for method in ("saliency", "input_x_gradient"):
        torch.testing.assert_close(attribute(folded, x, y, method), attribute(frozen, x, y, method), atol=1e-5, rtol=1e-4)
    ig_folded = attribute(folded, x, y, "integrated_gradients", n_steps=16)
    ig_frozen = attribute(frozen, x, y, "integrated_gradients", n_steps=16)
    # Per image the integral is the same; single pixels may differ where a max-pool window holds
    # exactly equal values (flat background) and folding's rounding picks another winner.
    torch.testing.assert_close(ig_folded.sum(dim=(1, 2, 3)), ig_frozen.sum(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ig_folded, ig_frozen, atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_a_class_without_attribution_is_reported_not_passed_off_as_a_distribution(digits, tmp_path):
    from digitlens.explain.maps import save_maps
    from digitlens.plots.heatmaps import PerDigitMapsDisplay
    from digitlens.runio import read_npz

    model = _linear_model()
    with torch.no_grad():
        model[1].weight[1] = 0.0  # the score of digit 1 depends on no pixel: saliency is 0 everywhere
    x, y = digits.test.images[:120], digits.test.labels[:120]
    out = explain_model(model, x, y.numpy(), methods=["saliency"], faithfulness_size=0)
    maps = out["maps"]["saliency"]
    assert np.isnan(maps[1]).all() and out["empty_maps"] == {"saliency": ["1"]}
    others = np.delete(maps, 1, axis=0)
    np.testing.assert_allclose(others.sum(axis=(1, 2)), 1.0)
    saved = read_npz(tmp_path / save_maps(tmp_path, out)["saliency"])
    assert saved["has_mass"].tolist() == [d != 1 for d in range(10)]
    assert np.isnan(saved["maps"][1]).all()
    disp = PerDigitMapsDisplay(maps=maps, counts=out["counts"]).plot()
    assert disp.notes_[1] == "attribution zero\non every image" and disp.notes_.count(None) == 9
    texts = [t.get_text() for t in disp.axes_.ravel()[1].texts]
    assert any("no map" in t for t in texts)


def test_the_faithfulness_module_is_not_shadowed_by_a_function():
    import importlib
    import types

    import digitlens.explain

    module = importlib.import_module("digitlens.explain.faithfulness")
    assert isinstance(module, types.ModuleType) and hasattr(module, "perturbation_curves")
    assert isinstance(digitlens.explain.faithfulness, types.ModuleType)


@pytest.mark.slow
def test_every_flag_an_error_names_exists_and_methods_take_dashes(tiny_cnn):
    import re
    from pathlib import Path

    from typer.testing import CliRunner

    from digitlens.cli import app
    from digitlens.explain.methods import parse_methods

    assert parse_methods("integrated-gradients,input-x-gradient", tiny_cnn) == ("integrated_gradients", "input_x_gradient")
    src = Path(__file__).resolve().parents[1] / "src" / "digitlens"
    named = {m for f in src.rglob("*.py") for m in re.findall(r'DigitlensError\(\s*f?"(--[a-z][a-z-]+)', f.read_text())}
    runner = CliRunner()
    helps = "".join(runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output
                    for cmd in ("train", "evaluate", "explain", "predict", "adapt", "subspace", "report", "demo", "serve"))
    missing = sorted(flag for flag in named if flag not in helps)
    assert not missing, f"errors name flags no command has: {missing}"


def test_the_verdict_says_when_the_runner_up_is_within_noise():
    from digitlens.explain.verdict import margin_over_runner_up
    from digitlens.intervals import bootstrap_indices

    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.2, 400)
    verdict = {"most_faithful": "a", "ranking": ["a", "b", "c"], "eligible": ["a", "b"]}
    close = margin_over_runner_up(verdict, {"a": base + 0.002, "b": base + rng.normal(0, 0.05, 400), "c": base})
    assert close["runner_up"] == "b" and close["within_noise"]
    far = margin_over_runner_up(verdict, {"a": base + 0.1, "b": base, "c": base})
    assert not far["within_noise"] and far["difference"] == pytest.approx(0.1)
    # the interval is the percentile interval of the paired bootstrap means, computed by a loop
    diff = (base + 0.1) - base
    means = [diff[row].mean() for row in bootstrap_indices(400, 1000, 0)]
    np.testing.assert_allclose(far["difference_ci"], np.quantile(means, [0.025, 0.975]))
    assert margin_over_runner_up({"most_faithful": "a", "ranking": ["a", "b"], "eligible": ["a"]},
                                 {"a": base, "b": base}) == {}


@pytest.mark.slow
def test_explain_compare_carries_the_paired_accuracy_test(tmp_path, tiny_cnn, digits):
    from scipy.stats import binomtest

    from digitlens.explain.run import explain_run
    from digitlens.inference import predict

    run_a = _write_run(tmp_path / "a", tiny_cnn, "cnn", {"widths": [4, 8, 8]})
    torch.manual_seed(5)
    other = _train(build_model("cnn", widths=(4, 8, 8)), digits.train.images[:300], digits.train.labels[:300], epochs=1)
    run_b = _write_run(tmp_path / "b", other, "cnn", {"widths": [4, 8, 8]})
    summary = explain_run(run_a, methods="saliency", split="val", faithfulness_size=0, figures=False, progress=False,
                          compare=run_b)
    comp = summary["comparison"]
    x, y = digits.val.images, digits.val.labels.numpy()
    right_a = predict(prepare_model(tiny_cnn), x)[0] == y
    right_b = predict(prepare_model(other), x)[0] == y
    b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    assert (comp["b"], comp["c"]) == (b, c)
    assert comp["mcnemar_p"] == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0)
    assert "McNemar" in comp["caption"]
    saved = json.loads((run_a / "explain" / "explain_metrics.json").read_text())
    assert saved["comparison"]["caption"] == comp["caption"]
