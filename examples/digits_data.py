"""What ``train_digits.py`` and ``mae_digits.py`` share: the digits data, the +-1 pixel shift augmentation, the
AdamW parameter groups and the learning-rate schedule. Not a script; the two examples import it from their own
folder (they put it on ``sys.path``, so they run from any working directory).

Data: ``sklearn.datasets.load_digits`` -- 1,797 grey-scale 8x8 scans of the digits 0-9 (values 0-16) from the
UCI "Optical Recognition of Handwritten Digits" set, shipped with scikit-learn (no download).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: The ``--backend`` choices of both examples (``auto``: fastvit's dispatch picks).
BACKENDS = ("auto", "eager", "triton", "cuda")


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as ``(x_train, y_train, x_test, y_test)``.

    Images are (B, 1, 8, 8) float32 in [0, 1] (raw values / 16), labels (B,) int64. The split is a fixed,
    stratified 80/20 split (``random_state=0``): 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image of ``x`` (B, C, H, W) by an independent random offset in [-max_shift, max_shift]².

    Pixels shifted in are 0 (the digits' background, before standardisation). Offsets are drawn on the CPU from
    ``generator`` so a run is reproducible on any device.
    """
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator).to(x.device)
    rows = off[0, :, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = off[1, :, None] + torch.arange(W, device=x.device)  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, tokens or position embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in name or "token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
