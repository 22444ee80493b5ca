"""The registered ensemble: an MLflow pyfunc model averaging its members' softmax scores.

Shipped with the model (code_paths) together with `models/`; imports torch, numpy and the zoo only.
Input: normalised images, float32 N x C x H x W (any H, W: the nets are fully convolutional).
Output: {"probabilities": N x K, "top5": N x 5 class indices}.
"""

from __future__ import annotations

import json
import warnings

import mlflow.pyfunc
import numpy as np
import torch

import models

from .scoring import view_averaged_probs


def build_member(spec: dict, state_dict: dict) -> torch.nn.Module:
    """A member network from its spec ({"label", "model", "overrides", "num_classes"}) and weights."""
    net = models.create_model(spec["model"], num_classes=spec["num_classes"], **spec.get("overrides", {}))
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"member {spec['label']!r}: its weights do not match {spec['model']} "
            f"(overrides {spec.get('overrides', {})}): {str(e).splitlines()[0]} {_mismatch(net, state_dict)}"
        ) from None
    return net.eval()


def _mismatch(net: torch.nn.Module, state: dict) -> str:
    ours = net.state_dict()
    missing = sorted(set(ours) - set(state))[:5]
    unexpected = sorted(set(state) - set(ours))[:5]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)][:3]
    parts = []
    if missing:
        parts.append(f"missing keys {missing}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected}")
    if shapes:
        parts.append(f"shape mismatches (file vs model) {shapes}")
    return "; ".join(parts)


def member_probs(members: list[torch.nn.Module], images) -> torch.Tensor:
    """M x N x K softmax scores, each averaged over the test views of `images`."""
    with torch.no_grad():
        return torch.stack([view_averaged_probs(m, images) for m in members])


# MLflow advises type hints on `predict` when a PythonModel subclass is defined, under a "once" filter of
# its own that no warnings filter can override; our signature is explicit, and type hints would turn on
# a list-based input conversion. So that one advice is dropped where it is shown, for this definition only.
_show = warnings.showwarning


def _without_type_hint_advice(message, category, filename, lineno, file=None, line=None):
    if "Add type hints to the `predict` method" not in str(message):
        _show(message, category, filename, lineno, file, line)


warnings.showwarning = _without_type_hint_advice


class ResNetEnsemble(mlflow.pyfunc.PythonModel):
    """Artifacts: "ensemble" (a JSON description) and "member_<i>" (each member's state_dict file)."""

    def load_context(self, context) -> None:
        with open(context.artifacts["ensemble"]) as f:
            self.meta = json.load(f)
        self.members = [
            build_member(spec, torch.load(context.artifacts[f"member_{i}"], weights_only=True, map_location="cpu"))
            for i, spec in enumerate(self.meta["members"])
        ]

    def predict(self, context, model_input, params=None) -> dict:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        probs = member_probs(self.members, x).mean(0)
        k = min(5, probs.shape[1])
        return {"probabilities": probs.numpy(), "top5": probs.topk(k, dim=1).indices.numpy()}


warnings.showwarning = _show
