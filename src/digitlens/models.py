"""Digit classifiers chosen by name: ``cnn`` (the fast default), ``mlp`` and ``vit``.

Every model takes images of shape (N, 1, 28, 28) in [0, 1] (it normalises them itself) and
returns logits of shape (N, n_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from digitlens.errors import DigitlensError
from digitlens.runio import atomic_path, read_json, require_run_dir

MODELS = ("cnn", "mlp", "vit")

# MNIST pixel mean and standard deviation; applied inside every model so inputs stay in [0, 1].
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081


class Normalize(nn.Module):
    """(x - mean) / std with fixed constants."""

    def __init__(self, mean: float = PIXEL_MEAN, std: float = PIXEL_STD):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CNN(nn.Module):
    """A compact CNN with batch norm, built for speed on a CPU (about 34k parameters):
    a 5x5 stride-2 conv (28x28 -> 14x14), a 3x3 conv and max-pool (-> 7x7), a 3x3 conv and
    max-pool (-> 4x4), then one linear layer on the flattened 4x4 maps.

    ``widths`` are the channels of the three conv layers. The 28x28 input is never convolved at
    full resolution with many channels; that is where a plain CNN spends most of its time.

    ``pool_ceil=True`` (the default) pools the last 7x7 map in ceil mode, so its row 6 and column
    6 reach the classifier. Runs saved before digitlens 0.2 used floor mode (-> 3x3): that pool
    dropped the last row and column, whose Grad-CAM then lit up positions the classifier never
    read; their ``config.json`` has no ``pool_ceil`` and loads with ``pool_ceil=False``.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), n_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, pool_ceil: bool = True):
        super().__init__()
        if len(widths) != 3:
            raise DigitlensError(f"cnn widths {tuple(widths)}: expected 3 channel counts")
        w1, w2, w3 = (int(w) for w in widths)
        self.normalize = Normalize()
        self.features = nn.Sequential(
            _conv_block(in_channels, w1, kernel=5, stride=2),
            _conv_block(w1, w2), nn.MaxPool2d(2, ceil_mode=bool(pool_ceil)),
            _conv_block(w2, w3), nn.MaxPool2d(2, ceil_mode=bool(pool_ceil)),
        )
        side = (image_size + 1) // 2
        for _ in range(2):
            side = (side + 1) // 2 if pool_ceil else side // 2
        self.classifier = nn.Linear(w3 * side * side, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(x, 1))


class MLP(nn.Module):
    """A multi-layer perceptron on the flattened 28x28 image; ``widths`` are the hidden sizes."""

    def __init__(self, widths: tuple[int, ...] = (256, 128), n_classes: int = 10, image_size: int = 28, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [Normalize(), nn.Flatten()]
        prev = image_size * image_size
        for width in widths:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = width
        layers.append(nn.Linear(prev, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` linear layers.

    The last attention weights, shape (N, heads, tokens, tokens), are kept in ``self.weights``
    when ``self.keep_weights`` is True.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise DigitlensError(f"vit dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.keep_weights = False
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        # Written out rather than scaled_dot_product_attention: for 50 tokens the explicit product is
        # faster on a CPU (PyTorch's CPU flash kernel is built for long sequences), and it gives the
        # attention weights that explanations need from the same code path.
        weights = torch.softmax((q * self.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
        if self.keep_weights:
            self.weights = weights
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (Vaswani et al. 2017, as 2-D in MAE / "Better plain
    ViT baselines", Beyer et al. 2022): shape (1 + grid*grid, dim), a zero row first for the class token."""
    if dim % 4:
        raise DigitlensError(f"vit dim {dim}: the sine-cosine position embedding needs a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()


class PatchEmbedding(nn.Module):
    """Embeds each ``patch`` x ``patch`` patch on its own (no overlap): a linear map as in the
    original ViT, or with ``hidden`` > 0 a small MLP per patch (linear -> GELU -> linear), which
    trains faster on small data and keeps every token a function of exactly its own patch.

    ``proj`` holds the first layer's filters, shape (hidden or dim, channels, patch, patch).
    Returns tokens of shape (N, grid*grid, dim).
    """

    def __init__(self, in_channels: int, dim: int, patch: int, hidden: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden or dim, kernel_size=patch, stride=patch)
        self.mlp = nn.Sequential(nn.GELU(), nn.Conv2d(hidden, dim, kernel_size=1)) if hidden else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj(x)).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """A small Vision Transformer: ``patch`` x ``patch`` patches (7x7 tokens for 28x28 and 4x4
    patches) plus a class token, ``depth`` blocks with separate ``q``, ``k``, ``v`` layers.

    ``patch_hidden`` > 0 embeds each patch with a small MLP (see :class:`PatchEmbedding`);
    ``pos_embed`` is ``"learned"`` (a parameter) or ``"sincos"`` (fixed 2-D sine-cosine).
    ``forward(x, return_attention=True)`` returns ``(logits, attentions)`` where attentions is a
    list with one tensor of shape (N, heads, 1 + grid*grid, 1 + grid*grid) per block.
    """

    def __init__(self, dim: int = 128, depth: int = 4, heads: int = 4, mlp_dim: int = 256, patch: int = 4,
                 image_size: int = 28, n_classes: int = 10, in_channels: int = 1, patch_hidden: int = 0,
                 pos_embed: str = "learned"):
        super().__init__()
        if image_size % patch:
            raise DigitlensError(f"vit patch {patch} does not divide image size {image_size}")
        if pos_embed not in ("learned", "sincos"):
            raise DigitlensError(f"vit pos_embed {pos_embed!r}: choose learned or sincos")
        self.patch, self.grid = patch, image_size // patch
        self.normalize = Normalize()
        self.patch_embed = PatchEmbedding(in_channels, dim, patch, int(patch_hidden))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid * self.grid, dim) * 0.02)
        else:
            self.register_buffer("pos_embed", sincos_position_embedding(self.grid, dim)[None])
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        tokens = self.patch_embed(self.normalize(x))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        attentions = []
        for block in self.blocks:
            block.attn.keep_weights = return_attention
            tokens = block(tokens)
            if return_attention:
                attentions.append(block.attn.weights)
                block.attn.weights, block.attn.keep_weights = None, False
        logits = self.head(self.norm(tokens[:, 0]))
        return (logits, attentions) if return_attention else logits


#: Weight names of runs saved by digitlens 0.1 (before PatchEmbedding), renamed on loading.
LEGACY_KEYS = {"vit": {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias"}}

#: Architecture arguments added after runs were first saved, with the value those older runs
#: used; a ``config.json`` without the key loads with it.
LEGACY_MODEL_KWARGS = {"cnn": {"pool_ceil": False}}


def build_model(name: str, n_classes: int = 10, **kwargs) -> nn.Module:
    """Build a model by name (``cnn``, ``mlp`` or ``vit``) with optional width arguments."""
    if name == "cnn":
        return CNN(n_classes=n_classes, **kwargs)
    if name == "mlp":
        return MLP(n_classes=n_classes, **kwargs)
    if name == "vit":
        return ViT(n_classes=n_classes, **kwargs)
    raise DigitlensError(f"--model {name!r}: unknown model (choose from {', '.join(MODELS)})")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_model(model: nn.Module, path) -> None:
    """Write ``model.state_dict()`` to a ``.safetensors`` file atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


#: Bounds on the numbers of a run's ``config.json`` that size a model: a class count or width
#: outside them is a damaged file, refused before any memory is allocated.
MAX_CLASSES = 1000
MAX_WIDTH = 1 << 14


def check_model_config(config, config_path) -> dict:
    """The keyword arguments that rebuild a run's model from its ``config.json`` dict (``model``,
    ``n_classes``, ``model_kwargs``), after checking their types and sizes; a one-line
    DigitlensError naming ``config_path`` and the field otherwise."""
    if not isinstance(config, dict):
        raise DigitlensError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    for key in ("model", "n_classes"):
        if key not in config:
            raise DigitlensError(f"{config_path}: missing key {key!r}")
    if config["model"] not in MODELS:
        raise DigitlensError(f"{config_path}: model {config['model']!r} is not one of {', '.join(MODELS)}")
    n_classes = config["n_classes"]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or not 2 <= n_classes <= MAX_CLASSES:
        raise DigitlensError(f"{config_path}: n_classes {n_classes!r} is not a whole number from 2 to {MAX_CLASSES}")
    model_kwargs = config.get("model_kwargs", {})
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict):
        raise DigitlensError(f"{config_path}: model_kwargs is a {type(model_kwargs).__name__}, expected an object")

    def numbers(value):
        if isinstance(value, (list, tuple)):
            for item in value:
                yield from numbers(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield value
        elif not isinstance(value, (bool, str)) and value is not None:
            yield value

    for key, value in model_kwargs.items():
        for number in numbers(value):
            if not isinstance(number, (int, float)) or not -MAX_WIDTH <= number <= MAX_WIDTH or number != number:
                raise DigitlensError(f"{config_path}: model_kwargs {key}={value!r} is out of range "
                                     f"(numbers up to {MAX_WIDTH})")
    return {**LEGACY_MODEL_KWARGS.get(config["model"], {}), **model_kwargs}


def load_model(run_dir) -> nn.Module:
    """Rebuild the model of a run folder from ``config.json`` (keys ``model``, ``model_kwargs``,
    ``n_classes``) and load ``model.safetensors``; returned in eval mode."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = require_run_dir(run_dir)
    config = read_json(run_dir / "config.json")
    kwargs = check_model_config(config, run_dir / "config.json")
    try:
        model = build_model(config["model"], n_classes=config["n_classes"], **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # an argument the model does not take, a width that does not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DigitlensError(f"{run_dir / 'config.json'}: model_kwargs {config.get('model_kwargs')} do not build "
                             f"model {config['model']!r} ({first})") from None
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise DigitlensError(f"{weights}: file not found (training did not finish; try `digitlens train --resume`)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise DigitlensError(f"{weights}: not a readable safetensors file ({exc})") from None
    for old_key, new_key in LEGACY_KEYS.get(config["model"], {}).items():
        if old_key in state and new_key not in state:  # a run saved by an earlier digitlens
            state[new_key] = state.pop(old_key)
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].is_floating_point():
            if not tensor.is_floating_point():  # load_state_dict would cast int8 codes silently
                raise DigitlensError(f"{weights}: tensor {key!r} is {str(tensor.dtype).replace('torch.', '')}, "
                                     "expected floating-point weights (quantised weights are not loaded)")
            if not torch.isfinite(tensor).all():
                raise DigitlensError(f"{weights}: tensor {key!r} holds NaN or infinite values")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DigitlensError(f"{weights}: weights do not fit model {config['model']!r} ({first})") from None
    return model.eval()
