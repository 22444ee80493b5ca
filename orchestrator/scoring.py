"""Scores and errors: softmax averaged over test views and over ensemble members; top-k; log loss.

Torch and numpy only, so the registered ensemble model can ship and import it without Ray.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def view_averaged_probs(model: torch.nn.Module, images, device="cpu") -> torch.Tensor:
    """Softmax scores averaged over the test views of each image.

    `images` is one batch (B x C x H x W), a batch of crops (B x V x C x H x W, e.g. 10-crop), or a
    tuple of batches at several scales (the fully-convolutional multi-scale test).
    """
    views = list(images) if isinstance(images, tuple | list) else [images]
    total = None
    for v in views:
        v = v.to(device, non_blocking=True)
        if v.dim() == 5:
            b, nv = v.shape[:2]
            p = F.softmax(model(v.flatten(0, 1)).float(), dim=1).view(b, nv, -1).mean(1)
        else:
            p = F.softmax(model(v).float(), dim=1)
        total = p if total is None else total + p
    return total / len(views)


def correct_topk(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


def error_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """top1_err and top5_err in %, and the log loss (mean negative log-likelihood) of `probs`."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    c1, c5 = correct_topk(p, y)
    n = max(len(y), 1)
    nll = float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean()) if len(y) else float("nan")
    return {"top1_err": 100 * (1 - c1 / n), "top5_err": 100 * (1 - c5 / n), "log_loss": nll, "n": len(y)}
