"""θ to bytes and back: a compressed ``.npz`` (no pickle, so loading is safe)."""

from __future__ import annotations

import io

import numpy as np
import torch

from metarec.errors import MetarecError
from metarec.model import Theta

SCHEMA = "metarec.theta/1"


class SnapshotError(MetarecError, ValueError):
    """Bytes that are not a model snapshot, or one of another shape."""


def dumps(theta: Theta) -> bytes:
    buf = io.BytesIO()
    arrays = {k: v.detach().cpu().numpy() for k, v in theta.items()}
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def loads(payload: bytes, like: Theta | None = None,
          shapes: dict[str, tuple[int, ...]] | None = None) -> Theta:
    """Decode a snapshot; with ``like`` (or its ``shapes``), insist on the same
    parameters and shapes."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            theta = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    except (ValueError, OSError, KeyError) as exc:
        raise SnapshotError(f"not a model snapshot: {exc}") from exc
    expected = shapes if like is None else {k: tuple(v.shape) for k, v in like.items()}
    if expected is not None:
        got = {k: tuple(v.shape) for k, v in theta.items()}
        if expected != got:
            raise SnapshotError(f"snapshot shapes {got} do not match this config {expected}")
    return theta
