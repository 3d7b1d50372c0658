"""The per-event side of the model in numpy: score users and take their inner
steps, a few users at a time.

The serving loop runs one such step per wave, often for a single user in a
burst; there numpy's call overhead is a fraction of torch's. The math is that
of :func:`metarec.model.logit`, :func:`~metarec.model.inner_step` and
:func:`~metarec.model.prototype` (a test holds them equal); the torch versions
stay the differentiable ones the meta-update uses.
"""

from __future__ import annotations

import numpy as np

from metarec.model import Adaptation, ModelConfig


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def logit(phi: np.ndarray, q: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``phi`` n x (d+1), ``q`` n x d, ``base`` n."""
    return base + phi[:, -1] + np.einsum("nd,nd->n", phi[:, :-1], q)


def adapt(phi: np.ndarray, q: np.ndarray, base: np.ndarray, y: np.ndarray,
          weight: np.ndarray, lr: np.ndarray, phi0: np.ndarray,
          config: ModelConfig) -> np.ndarray:
    """``config.inner_steps`` steps from ``phi`` (n x d+1) on tasks ``q`` n x R x d,
    ``base``/``y``/``weight`` n x R (weight 0 = empty slot)."""
    if config.inner_steps == 0:
        return phi
    norm = weight / np.maximum(weight.sum(-1, keepdims=True), 1.0)
    if config.adaptation is Adaptation.PROTOTYPE:
        sign = (2 * y - 1) * norm
        shift = np.concatenate([np.matmul(sign[:, None, :], q)[:, 0], sign.sum(-1)[:, None]], -1)
        return phi0 + lr * shift
    for _ in range(config.inner_steps):
        z = base + phi[:, None, -1] + np.matmul(q, phi[:, :-1, None])[..., 0]
        err = (sigmoid(z) - y) * norm
        grad = np.concatenate([np.matmul(err[:, None, :], q)[:, 0], err.sum(-1)[:, None]], -1)
        phi = phi - lr * (grad + config.inner_l2 * (phi - phi0))
    return phi
