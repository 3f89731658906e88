"""What the network predicts, and the conversions between its three parameterizations (a leaf: imports torch only).

For z = alpha x + sigma eps (variance preserving: alpha^2 + sigma^2 = 1) the network outputs one of
- "eps": the noise eps;
- "v": v = alpha eps - sigma x (Salimans & Ho 2022), the paper's choice for its video models;
- "x": the data x.
Each determines the other two given z: x = (z - sigma eps) / alpha = alpha z - sigma v, eps = (z - alpha x) / sigma
= alpha v + sigma z. alpha, sigma are Python scalars, 0-d tensors or per-sample (B,) tensors broadcast over the
trailing dims of z. Guidance mixes predictions affinely (weights summing to 1), so it commutes with every conversion.
"""

from __future__ import annotations

import torch

from vdm_fast import _checks

PREDICTIONS = ("eps", "v", "x")


def check_prediction(prediction) -> str:
    return _checks.one_of(prediction, "prediction", PREDICTIONS)


def bcast(c, like: torch.Tensor):
    """A per-sample (B,) coefficient shaped to broadcast over like's trailing dims; scalars pass unchanged."""
    if isinstance(c, torch.Tensor) and c.dim() == 1:
        return c.view(-1, *([1] * (like.dim() - 1)))
    return c


def x_from_prediction(z: torch.Tensor, pred: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """x_hat from the network's output: eps: (z - sigma eps)/alpha; v: alpha z - sigma v; x: itself."""
    a, s = bcast(alpha, z), bcast(sigma, z)
    if prediction == "eps":
        return (z - s * pred) / a
    if prediction == "v":
        return a * z - s * pred
    return pred


def eps_from_prediction(z: torch.Tensor, pred: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """eps_hat from the network's output: eps: itself; v: alpha v + sigma z; x: (z - alpha x)/sigma."""
    a, s = bcast(alpha, z), bcast(sigma, z)
    if prediction == "eps":
        return pred
    if prediction == "v":
        return a * pred + s * z
    return (z - a * pred) / s


def prediction_target(x: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """What the network should output for z = alpha x + sigma eps: eps, v = alpha eps - sigma x, or x."""
    a, s = bcast(alpha, x), bcast(sigma, x)
    if prediction == "eps":
        return eps
    if prediction == "v":
        return a * eps - s * x
    return x


__all__ = ["PREDICTIONS", "check_prediction", "bcast", "x_from_prediction", "eps_from_prediction",
           "prediction_target"]
