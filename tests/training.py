"""A few epochs of Adam on small data, for tests that need a model which has learned something."""

from __future__ import annotations

import torch
from torch import nn


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3, seed: int = 0) -> nn.Module:
    """Train ``model`` on images x (N, C, H, W) and labels y (N,) with Adam (lr 3e-3, batches of 64,
    seeded shuffles); returns it in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
