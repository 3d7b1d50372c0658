"""The serving side of the model, compiled (numba): a micro-batch's predictions
and fast-weight steps in stream order in one call, its representation, and θ's
online step.

Users rate and click in bursts, so a micro-batch is mostly a few users' long
chains of predict, learn, predict, ...; each link depends on the one before,
so no batching across users can shorten them. Run in Python, each link was a
few dozen numpy calls (about 100 µs); compiled it is about a microsecond.

The math is that of :mod:`metarec.model` (``represent``, ``logit``,
``inner_step``, ``prototype``) and its autograd gradient; tests hold a
micro-batch through these kernels equal to the torch model, op by op. The torch
versions stay the differentiable ones that MAML, FOMAML and Meta-SGD use.
Compiled code is cached beside this file (``__pycache__``) on first use.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

PREDICT = 0
LEARN = 1

#: float32 arithmetic may be reassociated and contracted (vectorised sums, fused
#: multiply-adds): the serving loop and the adaptation about 1.7x faster, last-bit
#: differences in the scores (at most 9e-6 on MovieLens); NaN and infinity keep
#: their meaning.
FAST = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=FAST)
def _logit(phi: np.ndarray, q: np.ndarray, base: float) -> float:
    d = q.shape[0]
    z = base + float(phi[d])
    for c in range(d):
        z += phi[c] * q[c]
    return z


@njit(cache=True, fastmath=FAST)
def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@njit(cache=True, fastmath=FAST)
def _adapt(phi: np.ndarray, count: int, q: np.ndarray, base: np.ndarray, y: np.ndarray,
           mask: np.ndarray, decay: np.ndarray, lr: np.ndarray, phi0: np.ndarray,
           l2: float, steps: int, prototype: bool) -> None:
    """Adapt one user's ``phi`` in place on their task (``q`` W x d and ``base``,
    ``y``, ``mask`` W, by ring slot); ``count`` is the labels the user has given,
    which dates each slot for its recency weight ``decay[age]``."""
    if steps == 0:
        return
    width, d = q.shape
    ring = decay.shape[0]
    weight = np.empty(width, dtype=np.float32)
    total = np.float32(0.0)
    for s in range(width):
        weight[s] = mask[s] * decay[(count - 1 - s) % ring]
        total += weight[s]
    norm = max(total, np.float32(1.0))
    for s in range(width):
        weight[s] /= norm
    grad = np.empty(d + 1, dtype=np.float32)
    if prototype:
        grad[:] = 0.0
        for s in range(width):
            sign = (2.0 * y[s] - 1.0) * weight[s]
            for c in range(d):
                grad[c] += sign * q[s, c]
            grad[d] += sign
        for c in range(d + 1):
            phi[c] = phi0[c] + lr[c] * grad[c]
        return
    for _ in range(steps):
        grad[:] = 0.0
        for s in range(width):
            if weight[s] == 0.0:
                continue
            err = (_sigmoid(_logit(phi, q[s], base[s])) - y[s]) * weight[s]
            for c in range(d):
                grad[c] += err * q[s, c]
            grad[d] += err
        for c in range(d + 1):
            phi[c] -= lr[c] * (grad[c] + l2 * (phi[c] - phi0[c]))


@njit(cache=True, fastmath=FAST)
def serve(rows: np.ndarray, kind: np.ndarray, label: np.ndarray, q: np.ndarray,
          base: np.ndarray, task_of: np.ndarray, item: np.ndarray, context: np.ndarray,
          phi: np.ndarray, learned: np.ndarray, ring_item: np.ndarray,
          ring_context: np.ndarray, ring_label: np.ndarray,
          task_row: np.ndarray, task_q: np.ndarray, task_base: np.ndarray,
          task_y: np.ndarray, task_mask: np.ndarray,
          decay: np.ndarray, lr: np.ndarray, phi0: np.ndarray, l2: float, steps: int,
          prototype: bool, p: np.ndarray, k: np.ndarray, learn_phi: np.ndarray) -> None:
    """Run a micro-batch's ops in stream order.

    Per op ``i``: user row ``rows[i]``, ``kind[i]``, its representation ``q[i]``,
    ``base[i]`` and, for a learner, ``task_of[i]``: its user's row in the batch's
    task arrays (``task_*``, already represented under this batch's θ). A
    prediction writes ``p[i]`` and ``k[i]``; a label writes ``learn_phi[i]`` (the
    weights it met), joins the user's ring (``ring_*``, in the store) and task,
    and the user is adapted before their next prediction or at the end. So a
    user's consecutive labels are learned as one step, as a wave of them would be.
    """
    stale = np.zeros(task_row.shape[0], dtype=np.bool_)
    ring = ring_item.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        j = task_of[i]
        if kind[i] == PREDICT:
            if j >= 0 and stale[j]:
                _adapt(phi[r], learned[r], task_q[j], task_base[j], task_y[j], task_mask[j],
                       decay, lr, phi0, l2, steps, prototype)
                stale[j] = False
            p[i] = _sigmoid(_logit(phi[r], q[i], base[i]))
            k[i] = learned[r]
            continue
        learn_phi[i] = phi[r]
        s = learned[r] % ring
        task_q[j, s] = q[i]
        task_base[j, s] = base[i]
        task_y[j, s] = label[i]
        task_mask[j, s] = 1.0
        ring_item[r, s] = item[i]
        ring_context[r, s] = context[i]
        ring_label[r, s] = np.int8(label[i])
        learned[r] += 1
        stale[j] = True
    for j in range(task_row.shape[0]):
        if stale[j]:
            r = task_row[j]
            _adapt(phi[r], learned[r], task_q[j], task_base[j], task_y[j], task_mask[j],
                   decay, lr, phi0, l2, steps, prototype)


@njit(cache=True, fastmath=FAST)
def adapt_tasks(phi: np.ndarray, q: np.ndarray, base: np.ndarray, y: np.ndarray,
                mask: np.ndarray, lr: np.ndarray, phi0: np.ndarray, l2: float, steps: int,
                prototype: bool) -> None:
    """Adapt every user's ``phi`` (n x d+1) in place on their whole task (n x R),
    every example weighted alike: :func:`metarec.model.adapt_represented`."""
    flat = np.ones(q.shape[1], dtype=np.float32)
    for u in range(phi.shape[0]):
        _adapt(phi[u], 0, q[u], base[u], y[u], mask[u], flat, lr, phi0, l2, steps, prototype)


@njit(cache=True, fastmath=FAST)
def _add_mean(out: np.ndarray, i: int, feats: np.ndarray, feat_emb: np.ndarray,
              feat_bias: np.ndarray) -> float:
    """Add the mean embedding of row ``i``'s present ``feats`` (slot 0 = empty) to
    ``out[i]``; the sum of their biases. Rows by index, not as views: a view per
    call kept the loops from being vectorised."""
    count = 0
    for j in range(feats.shape[1]):
        count += feats[i, j] > 0
    if count == 0:
        return 0.0
    inv = np.float32(1.0) / np.float32(count)
    bias = 0.0
    for j in range(feats.shape[1]):
        f = feats[i, j]
        if f > 0:
            bias += feat_bias[f]
            for c in range(out.shape[1]):
                out[i, c] += feat_emb[f, c] * inv
    return bias


@njit(cache=True, fastmath=FAST)
def represent(item: np.ndarray, item_feats: np.ndarray, user_feats: np.ndarray,
              item_emb: np.ndarray, item_bias: np.ndarray, feat_emb: np.ndarray,
              feat_bias: np.ndarray, global_bias: float,
              q: np.ndarray, base: np.ndarray, side: np.ndarray) -> None:
    """:func:`metarec.model.represent` for ``n`` examples (feature slot 0 = empty):
    writes ``q`` and ``side`` (n x d, the item's and the user's side) and ``base``."""
    d = q.shape[1]
    for i in range(item.shape[0]):
        it = item[i]
        for c in range(d):
            q[i, c] = item_emb[it, c]
            side[i, c] = 0.0
        b = global_bias + item_bias[it]
        b += _add_mean(q, i, item_feats, feat_emb, feat_bias)
        b += _add_mean(side, i, user_feats, feat_emb, feat_bias)
        dot = np.float32(0.0)
        for c in range(d):
            dot += side[i, c] * q[i, c]
        base[i] = b + dot


@njit(cache=True, fastmath=FAST)
def _add_row(grad: np.ndarray, row: int, values: np.ndarray, scale: float, bias: float,
             touched: np.ndarray, rows: np.ndarray, n_rows: int) -> int:
    """Add ``scale * values`` (d) and ``bias`` (the last column) to ``grad[row]``,
    noting a row touched for the first time; the count of touched rows."""
    if not touched[row]:
        touched[row] = True
        rows[n_rows] = row
        n_rows += 1
    d = values.shape[0]
    for c in range(d):
        grad[row, c] += scale * values[c]
    grad[row, d] += bias
    return n_rows


@njit(cache=True, fastmath=FAST)
def _add_bag(grad: np.ndarray, feats: np.ndarray, values: np.ndarray, bias: float,
             touched: np.ndarray, rows: np.ndarray, n_rows: int) -> int:
    """:func:`_add_row` for a feature bag (slot 0 = empty): the gradient ``values``
    of its mean embedding is shared by its features, that of its bias sum is each's."""
    count = 0
    for f in feats:
        count += f > 0
    for f in feats:
        if f > 0:
            n_rows = _add_row(grad, f, values, 1.0 / count, bias, touched, rows, n_rows)
    return n_rows


@njit(cache=True, fastmath=FAST)
def _adagrad_rows(table: np.ndarray, bias: np.ndarray, acc: np.ndarray, acc_bias: np.ndarray,
                  grad: np.ndarray, touched: np.ndarray, rows: np.ndarray, n_rows: int,
                  lr: float, eps: float) -> None:
    """Adagrad on the touched rows of a table and its bias (``grad``'s last column);
    the gradient buffers are left zero for the next batch."""
    d = table.shape[1]
    for k in range(n_rows):
        r = rows[k]
        for c in range(d):
            g = grad[r, c]
            acc[r, c] += g * g
            table[r, c] -= lr * g / (math.sqrt(acc[r, c]) + eps)
            grad[r, c] = 0.0
        g = grad[r, d]
        acc_bias[r] += g * g
        bias[r] -= lr * g / (math.sqrt(acc_bias[r]) + eps)
        grad[r, d] = 0.0
        touched[r] = False


@njit(cache=True, fastmath=FAST)
def online_step(item: np.ndarray, item_feats: np.ndarray, user_feats: np.ndarray,
                q: np.ndarray, side: np.ndarray, err: np.ndarray, phi: np.ndarray,
                item_emb: np.ndarray, item_bias: np.ndarray, feat_emb: np.ndarray,
                feat_bias: np.ndarray, global_bias: np.ndarray,
                acc_item_emb: np.ndarray, acc_item_bias: np.ndarray,
                acc_feat_emb: np.ndarray, acc_feat_bias: np.ndarray, acc_global: np.ndarray,
                item_grad: np.ndarray, feat_grad: np.ndarray,
                item_touched: np.ndarray, feat_touched: np.ndarray,
                lr: float, eps: float) -> None:
    """θ's Adagrad step on the summed logistic loss of ``n`` labelled examples,
    ``err = sigmoid(logit) - label`` (the loss's derivative in the logit), each
    scored with the fast weights ``phi`` it met; the gradient of
    :func:`metarec.model.represent` and :func:`~metarec.model.logit`, written out.

    ``item_grad``/``feat_grad`` (rows x d+1, zero) and ``*_touched`` (False) are
    scratch the size of the tables, so only the rows a batch touches cost anything.
    """
    n, d = q.shape
    item_rows = np.empty(n, dtype=np.int64)
    feat_rows = np.empty(n * (item_feats.shape[1] + user_feats.shape[1]), dtype=np.int64)
    n_item = n_feat = 0
    vec = np.empty(d, dtype=np.float32)
    for i in range(n):
        e = err[i]
        # ∂logit/∂q = side + φ[:d];  ∂logit/∂side = q
        for c in range(d):
            vec[c] = e * (side[i, c] + phi[i, c])
        n_item = _add_row(item_grad, item[i], vec, 1.0, e, item_touched, item_rows, n_item)
        n_feat = _add_bag(feat_grad, item_feats[i], vec, e, feat_touched, feat_rows, n_feat)
        for c in range(d):
            vec[c] = e * q[i, c]
        n_feat = _add_bag(feat_grad, user_feats[i], vec, e, feat_touched, feat_rows, n_feat)
    g = err.sum()
    acc_global[0] += g * g
    global_bias[0] -= lr * g / (math.sqrt(acc_global[0]) + eps)
    _adagrad_rows(item_emb, item_bias, acc_item_emb, acc_item_bias, item_grad, item_touched,
                  item_rows, n_item, lr, eps)
    _adagrad_rows(feat_emb, feat_bias, acc_feat_emb, acc_feat_bias, feat_grad, feat_touched,
                  feat_rows, n_feat, lr, eps)


def logits(phi: np.ndarray, q: np.ndarray, base: np.ndarray) -> np.ndarray:
    """:func:`metarec.model.logit` in numpy: ``phi`` n x (d+1), ``q`` n x d, ``base`` n."""
    return base + phi[:, -1] + np.einsum("nd,nd->n", phi[:, :-1], q)
