"""θ as the kernels' arrays, and examples represented under it (compiled)."""

from __future__ import annotations

import numpy as np

from metarec import kernels
from metarec.kernels import ExampleIds, Represented, ThetaArrays
from metarec.model import Theta


def theta_arrays(theta: Theta) -> ThetaArrays:
    """Numpy views of θ's tables and global bias (writes reach θ)."""
    return ThetaArrays(theta["item_emb"].numpy(), theta["item_bias"].numpy(),
                       theta["feat_emb"].numpy(), theta["feat_bias"].numpy(),
                       theta["global_bias"].numpy())


def represent(theta: Theta, ids: ExampleIds) -> Represented:
    """:func:`metarec.model.represent` under θ, compiled, for examples of any leading
    shape ``S``: ``q`` and the user side S x d, ``base`` S."""
    shape, d = ids.item.shape, theta["item_emb"].shape[1]
    n = ids.item.size
    out = Represented(np.empty((n, d), dtype=np.float32), np.empty(n, dtype=np.float32),
                      np.empty((n, d), dtype=np.float32))
    # explicit widths: a batch may hold no example at all (impressions, no label)
    flat = ExampleIds(ids.item.reshape(n), ids.item_feats.reshape(n, ids.item_feats.shape[-1]),
                      ids.user_feats.reshape(n, ids.user_feats.shape[-1]))
    kernels.represent(flat, theta_arrays(theta), out)
    return Represented(out.q.reshape(*shape, d), out.base.reshape(shape),
                       out.side.reshape(*shape, d))
