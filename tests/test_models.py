"""Models: output shapes, the ViT's attention weights, saving and loading."""

import pytest
import torch

from digitlens.errors import DigitlensError
from digitlens.models import ViT, build_model, count_parameters, load_model, save_model
from digitlens.runio import write_json


@pytest.mark.parametrize("name", ["cnn", "mlp", "vit"])
@pytest.mark.parametrize("n_classes", [10, 3])
def test_logits_shape(name, n_classes):
    torch.manual_seed(0)
    model = build_model(name, n_classes=n_classes).eval()
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, n_classes)


def test_cnn_widths_change_parameter_count():
    small = build_model("cnn", widths=(8, 16, 24))
    default = build_model("cnn")
    assert count_parameters(small) < count_parameters(default)
    with pytest.raises(DigitlensError, match="widths"):
        build_model("cnn", widths=(8, 16))


def test_unknown_model_is_one_line_error():
    with pytest.raises(DigitlensError, match="unknown model") as info:
        build_model("resnet")
    assert "\n" not in str(info.value)


def test_vit_default_width_allows_rank_64_lora():
    model = ViT()
    assert model.blocks[0].attn.q.in_features >= 128


def _naive_attention(block, tokens):
    """softmax(q k^T / sqrt(head_dim)) computed by hand from the block's q and k layers."""
    attn = block.attn
    h = block.norm1(tokens)
    n, t, d = h.shape
    q = (h @ attn.q.weight.T + attn.q.bias).view(n, t, attn.heads, attn.head_dim).permute(0, 2, 1, 3)
    k = (h @ attn.k.weight.T + attn.k.bias).view(n, t, attn.heads, attn.head_dim).permute(0, 2, 1, 3)
    scores = torch.einsum("nhid,nhjd->nhij", q, k) / attn.head_dim ** 0.5
    return torch.exp(scores - scores.amax(-1, keepdim=True)) / torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1, keepdim=True)


@pytest.mark.slow
def test_vit_returns_attention_of_every_block():
    torch.manual_seed(0)
    model = ViT(dim=32, depth=3, heads=4, mlp_dim=64).eval()
    x = torch.rand(4, 1, 28, 28)
    block_inputs = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: block_inputs.append(args[0].detach())) for b in model.blocks]
    with torch.no_grad():
        logits_plain = model(x)
        block_inputs.clear()
        logits, attentions = model(x, return_attention=True)
    for hook in hooks:
        hook.remove()
    assert len(attentions) == 3
    for block, tokens, weights in zip(model.blocks, block_inputs, attentions):
        assert weights.shape == (4, 4, 1 + 7 * 7, 1 + 7 * 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 4, 50), atol=1e-5, rtol=0)
        assert (weights >= 0).all()
        with torch.no_grad():
            torch.testing.assert_close(weights, _naive_attention(block, tokens), atol=1e-5, rtol=1e-4)
    # Asking for the weights does not change the logits.
    torch.testing.assert_close(logits, logits_plain, atol=1e-5, rtol=1e-4)
    # Asking for attention once does not leave the model keeping weights.
    assert all(b.attn.weights is None and not b.attn.keep_weights for b in model.blocks)


def test_vit_separate_qkv_layers():
    model = ViT(dim=32, depth=2, heads=2, mlp_dim=32)
    for block in model.blocks:
        for name in ("q", "k", "v", "proj"):
            layer = getattr(block.attn, name)
            assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("cnn", {"widths": [8, 16, 24]}), ("vit", {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 32})])
def test_save_and_load_model_round_trip(tmp_path, name, kwargs):
    pinned = {**kwargs, "pool_ceil": True} if name == "cnn" else kwargs  # as train() pins it
    torch.manual_seed(1)
    model = build_model(name, n_classes=10, **kwargs).eval()
    write_json(tmp_path / "config.json", {"model": name, "n_classes": 10, "model_kwargs": pinned})
    save_model(model, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_attention_output_matches_torch_scaled_dot_product_attention():
    torch.manual_seed(0)
    attn = ViT(dim=32, depth=1, heads=4, mlp_dim=32).blocks[0].attn
    x = torch.randn(3, 50, 32)
    n, t, d = x.shape
    q, k, v = (layer(x).view(n, t, 4, 8).transpose(1, 2) for layer in (attn.q, attn.k, attn.v))
    expected = attn.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)


def test_sincos_position_embedding_values():
    from digitlens.models import sincos_position_embedding

    table = sincos_position_embedding(7, 16)
    assert table.shape == (50, 16)
    assert torch.equal(table[0], torch.zeros(16))  # the class token gets no position
    # token 1 + 7*row + col: sin/cos of row * omega, then sin/cos of col * omega, omega = 1e4^(-i/4)
    row, col = 2, 5
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([torch.sin(row * omega), torch.cos(row * omega), torch.sin(col * omega), torch.cos(col * omega)])
    torch.testing.assert_close(table[1 + 7 * row + col], expected.float())
    assert len({tuple(r.tolist()) for r in table[1:]}) == 49  # every patch position is distinct
    with pytest.raises(DigitlensError, match="multiple of 4"):
        sincos_position_embedding(7, 18)
    model = ViT(dim=16, depth=1, heads=2, mlp_dim=16, pos_embed="sincos")
    assert "pos_embed" not in dict(model.named_parameters())  # fixed: not trained, not adapted


def test_patch_mlp_token_sees_only_its_own_patch():
    torch.manual_seed(0)
    model = ViT(dim=16, depth=1, heads=2, mlp_dim=16, patch_hidden=8).eval()
    x = torch.rand(1, 1, 28, 28)
    tokens = model.patch_embed(x)
    assert tokens.shape == (1, 49, 16)
    changed = x.clone()
    changed[0, 0, 8:12, 20:24] = torch.rand(4, 4)  # patch row 2, column 5
    diff = (model.patch_embed(changed) - tokens).abs().sum(-1)[0]
    assert diff[2 * 7 + 5] > 0 and diff.count_nonzero() == 1
    assert model.patch_embed.proj.weight.shape == (8, 1, 4, 4)  # the first layer's filters are 4x4 pixels


def test_vit_run_saved_before_patch_embedding_module_still_loads(tmp_path):
    torch.manual_seed(2)
    model = ViT(dim=16, depth=1, heads=2, mlp_dim=16).eval()
    from safetensors.torch import save_file

    state = {k.replace("patch_embed.proj.", "patch_embed."): v.contiguous() for k, v in model.state_dict().items()}
    assert "patch_embed.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    write_json(tmp_path / "config.json", {"model": "vit", "n_classes": 10,
                                          "model_kwargs": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16}})
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), model(x))


def test_cnn_reads_its_whole_last_map_and_runs_saved_before_that_still_load(tmp_path):
    from digitlens.models import CNN

    current = CNN()
    assert current.classifier.in_features == 64 * 4 * 4  # 7x7 pooled in ceil mode: row and column 6 are read
    legacy = CNN(pool_ceil=False).eval()
    assert legacy.classifier.in_features == 64 * 3 * 3
    # a config.json written before pool_ceil existed has no such key: it loads the floor-mode model
    write_json(tmp_path / "config.json", {"model": "cnn", "n_classes": 10, "model_kwargs": {
        "widths": [16, 32, 64], "in_channels": 1, "image_size": 28}})
    save_model(legacy, tmp_path / "model.safetensors")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(load_model(tmp_path)(x), legacy(x))
