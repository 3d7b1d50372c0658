"""The serving side of the model, compiled (numba): a micro-batch's predictions
and fast-weight steps in stream order in one call, its representation, θ's
online step, and the per-user adaptation they share with Reptile.

Users rate and click in bursts, so a micro-batch is mostly a few users' long
chains of predict, learn, predict, ...; each link depends on the one before,
so no batching across users can shorten them; compiled, a link costs about a
microsecond.

Every kernel takes named tuples of arrays (:class:`UserArrays`,
:class:`ThetaArrays`, ...), never long runs of positional arrays: two arrays of
the same dtype swapped would compile and run. A kernel binds the fields it uses
to locals, by name, before its loops: a field read inside a loop costs a
reference count per read and kept the loops from being vectorised (a third
slower). The per-user adaptation is picked
by the type of its settings (:class:`GradientSteps` or :class:`PrototypeShift`),
once per compilation, so the serving loop takes no flag and branches on none.

The math is that of :mod:`metarec.model` (``represent``, ``logit``,
``inner_step``, ``prototype``) and its autograd gradient; tests hold a
micro-batch through these kernels equal to the torch model, op by op.
Compiled code is cached beside this file (``__pycache__``) on first use. numba
checks a cached kernel against its own file only, so every kernel and every
named tuple they take lives in this one file: an edit anywhere recompiles all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit
from numba.extending import overload

PREDICT = 0
LEARN = 1

#: float32 arithmetic may be reassociated and contracted (vectorised sums, fused
#: multiply-adds): the serving loop and the adaptation about 1.7x faster, last-bit
#: differences in the scores (at most 9e-6 on MovieLens); NaN and infinity keep
#: their meaning.
FAST = {"reassoc", "contract", "nsz"}


# -- named inputs ------------------------------------------------------------------------


class ExampleIds(NamedTuple):
    """Index arrays of ``n`` examples; feature slot 0 is empty."""

    item: np.ndarray  # n, item bucket
    item_feats: np.ndarray  # n x item_slots
    user_feats: np.ndarray  # n x (user_slots + context_slots)


class ThetaArrays(NamedTuple):
    """θ's tables and global bias: numpy views of its tensors, written in place."""

    item_emb: np.ndarray  # item_buckets x d
    item_bias: np.ndarray  # item_buckets
    feat_emb: np.ndarray  # feature_buckets x d
    feat_bias: np.ndarray  # feature_buckets
    global_bias: np.ndarray  # 1


class AdagradArrays(NamedTuple):
    """Adagrad's sums of squared gradients, one per array of :class:`ThetaArrays`."""

    item_emb: np.ndarray
    item_bias: np.ndarray
    feat_emb: np.ndarray
    feat_bias: np.ndarray
    global_bias: np.ndarray


class Scratch(NamedTuple):
    """Gradient rows (zero) and touched-flags (False) the size of the item and feature
    tables: only the rows a batch touches cost anything, and the step leaves them
    zero and False again."""

    item_grad: np.ndarray  # item_buckets x d+1
    feat_grad: np.ndarray  # feature_buckets x d+1
    item_touched: np.ndarray  # item_buckets
    feat_touched: np.ndarray  # feature_buckets


class Represented(NamedTuple):
    """Everything of ``n`` logits except φ_u (:func:`represent` writes them)."""

    q: np.ndarray  # n x d, the item's side
    base: np.ndarray  # n, the biases and <user side, q>
    side: np.ndarray  # n x d, the user's side


class LabelledBatch(NamedTuple):
    """A micro-batch's labelled examples as they were scored: θ's online step."""

    ids: ExampleIds
    q: np.ndarray  # n x d
    side: np.ndarray  # n x d
    err: np.ndarray  # n, sigmoid(logit) - label: the loss's derivative in the logit
    phi: np.ndarray  # n x d+1, the fast weights each example met


class UserArrays(NamedTuple):
    """The user store's rows: fast weights, labels taught, and the ring of recent
    labelled examples (slot ``learned % ring`` is the next written)."""

    phi: np.ndarray  # users x d+1
    learned: np.ndarray  # users
    ring_item: np.ndarray  # users x ring
    ring_context: np.ndarray  # users x ring x context_slots
    ring_label: np.ndarray  # users x ring, int8


class OpArrays(NamedTuple):
    """A micro-batch's ops in stream order, represented under the batch's θ."""

    rows: np.ndarray  # n, user row in the store
    kind: np.ndarray  # n, PREDICT or LEARN
    label: np.ndarray  # n, meaningful for LEARN
    q: np.ndarray  # n x d
    base: np.ndarray  # n
    task_of: np.ndarray  # n, the op's user's row in BatchTasks, -1 if they only predict
    item: np.ndarray  # n, item bucket
    context: np.ndarray  # n x context_slots
    # n, the row of the task the op's task refines (-1: none): the user's, for a user ×
    # context task, whose weights are the user's plus its own residual
    prior: np.ndarray
    prior_task: np.ndarray  # n, the prior row's row in BatchTasks, -1 if it is not there


class BatchTasks(NamedTuple):
    """The tasks of a micro-batch's learning users by ring slot, represented under the
    batch's θ; :func:`serve` keeps them in step with the store's rings."""

    rows: np.ndarray  # m, user row in the store
    q: np.ndarray  # m x W x d
    base: np.ndarray  # m x W
    y: np.ndarray  # m x W
    mask: np.ndarray  # m x W, 1 for a filled slot
    prior: np.ndarray  # m, the prior row of a task that holds a residual, else -1


class WeightedTasks(NamedTuple):
    """Users' tasks with a weight per example (:func:`adapt_tasks`)."""

    q: np.ndarray  # n x R x d
    base: np.ndarray  # n x R
    y: np.ndarray  # n x R
    weight: np.ndarray  # n x R, 0 for an empty slot; normalised per user by the kernel


class Served(NamedTuple):
    """What :func:`serve` writes per op."""

    p: np.ndarray  # n, a prediction's probability
    k: np.ndarray  # n, labels the user had taught before a prediction
    learn_phi: np.ndarray  # n x d+1, the fast weights a label met


class GradientSteps(NamedTuple):
    """Adaptation by ``steps`` SGD steps on the user's weighted logistic loss plus
    ``l2/2 |φ - φ_0|²`` (:func:`metarec.model.inner_step`)."""

    lr: np.ndarray  # d+1, per-parameter inner rate
    phi0: np.ndarray  # d+1
    l2: float
    steps: int  # 0: no adaptation
    rate_labels: float  # the rate shrinks as (1 + k / rate_labels)^-1/2 (0: constant)


class PrototypeShift(NamedTuple):
    """Gradient-free adaptation: φ = φ_0 + lr · weighted mean of ±(q, 1), + for a
    click (:func:`metarec.model.prototype`)."""

    lr: np.ndarray  # d+1
    phi0: np.ndarray  # d+1
    steps: int  # 0: no adaptation


# -- the per-user adaptation -------------------------------------------------------------


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
def _gradient_steps(phi: np.ndarray, q: np.ndarray, base: np.ndarray, y: np.ndarray,
                    weight: np.ndarray, lr: np.ndarray, phi0: np.ndarray, l2: float,
                    steps: int, scale: float) -> None:
    """:class:`GradientSteps` on one user's task (``q`` W x d; ``base``, ``y`` and the
    normalised ``weight`` W), ``phi`` in place."""
    width, d = q.shape
    grad = np.empty(d + 1, dtype=np.float32)
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
            phi[c] -= scale * lr[c] * (grad[c] + l2 * (phi[c] - phi0[c]))


@njit(cache=True, fastmath=FAST)
def _rate_scale(rate_labels: float, k: int) -> float:
    """The inner rate's factor after k labels: (1 + k / rate_labels)^-1/2 (1 if 0)."""
    if rate_labels <= 0.0:
        return 1.0
    return float((1.0 + k / rate_labels) ** -0.5)


@njit(cache=True, fastmath=FAST)
def _prototype_shift(phi: np.ndarray, q: np.ndarray, y: np.ndarray, weight: np.ndarray,
                     lr: np.ndarray, phi0: np.ndarray, steps: int) -> None:
    """:class:`PrototypeShift` on one user's task, as :func:`_gradient_steps`."""
    if steps == 0:
        return
    width, d = q.shape
    shift = np.empty(d + 1, dtype=np.float32)
    shift[:] = 0.0
    for s in range(width):
        sign = (2.0 * y[s] - 1.0) * weight[s]
        for c in range(d):
            shift[c] += sign * q[s, c]
        shift[d] += sign
    for c in range(d + 1):
        phi[c] = phi0[c] + lr[c] * shift[c]


def adapt(rule: GradientSteps | PrototypeShift, phi: np.ndarray, q: np.ndarray,
          base: np.ndarray, y: np.ndarray, weight: np.ndarray, k: int) -> None:
    """Adapt one user's ``phi`` in place by ``rule`` on their task (``q`` W x d;
    ``base``, ``y`` and ``weight`` W, the weights normalised). Compiled code only:
    the rule's type chooses the kernel when the caller is compiled."""
    raise NotImplementedError("kernels.adapt is called from compiled code")


@overload(adapt, inline="always")
def _adapt_by_rule(rule, phi, q, base, y, weight, k):  # type: ignore[no-untyped-def]
    """The kernel of the rule's type (numba types a named tuple by its class), given
    the rule's fields by name: a named tuple handed on down the calls cost a tenth
    of an adaptation."""
    kind = getattr(rule, "instance_class", None)
    if kind is GradientSteps:
        def gradient(rule, phi, q, base, y, weight, k):  # type: ignore[no-untyped-def]
            _gradient_steps(phi, q, base, y, weight, lr=rule.lr, phi0=rule.phi0, l2=rule.l2,
                            steps=rule.steps, scale=_rate_scale(rule.rate_labels, k))
        return gradient
    if kind is PrototypeShift:
        def shift(rule, phi, q, base, y, weight, k):  # type: ignore[no-untyped-def]
            _prototype_shift(phi, q, y, weight, lr=rule.lr, phi0=rule.phi0, steps=rule.steps)
        return shift
    return None


@njit(cache=True, fastmath=FAST)
def _recency_weights(weight: np.ndarray, mask: np.ndarray, decay: np.ndarray,
                     count: int) -> None:
    """Normalised weights of a task by ring slot: ``decay[age]`` where the slot holds an
    example, its age being the labels given after it (``count`` labels in all)."""
    ring = decay.shape[0]
    total = np.float32(0.0)
    for s in range(weight.shape[0]):
        weight[s] = mask[s] * decay[(count - 1 - s) % ring]
        total += weight[s]
    norm = max(total, np.float32(1.0))
    for s in range(weight.shape[0]):
        weight[s] /= norm


@njit(cache=True, fastmath=FAST)
def _normalise(weight: np.ndarray) -> None:
    """Divide by the sum of the weights, or by 1 if that is smaller (as the torch
    inner loop does: a mean over the task's examples)."""
    total = np.float32(0.0)
    for s in range(weight.shape[0]):
        total += weight[s]
    norm = max(total, np.float32(1.0))
    for s in range(weight.shape[0]):
        weight[s] /= norm


@njit(cache=True, fastmath=FAST)
def adapt_tasks(phi: np.ndarray, tasks: WeightedTasks,
                rule: GradientSteps | PrototypeShift) -> None:
    """Adapt every user's ``phi`` (n x d+1) in place by ``rule`` on their whole task."""
    q, base, y, given = tasks.q, tasks.base, tasks.y, tasks.weight
    weight = np.empty(given.shape[1], dtype=np.float32)
    for u in range(phi.shape[0]):
        weight[:] = given[u]
        _normalise(weight)
        adapt(rule, phi[u], q[u], base[u], y[u], weight, 0)


# -- serving -----------------------------------------------------------------------------


@njit(cache=True, fastmath=FAST)
def _adapt_residual(rule: GradientSteps | PrototypeShift, delta: np.ndarray,
                    prior_phi: np.ndarray, q: np.ndarray, base: np.ndarray, y: np.ndarray,
                    weight: np.ndarray, k: int, shifted: np.ndarray) -> None:
    """Adapt a finer task's residual ``delta`` on its task, whose logits count its
    prior's weights ``prior_phi`` (in ``base``, shifted into ``shifted``)."""
    for s in range(q.shape[0]):
        shifted[s] = _logit(prior_phi, q[s], base[s])
    adapt(rule, delta, q, shifted, y, weight, k)


@njit(cache=True, fastmath=FAST)
def serve(ops: OpArrays, users: UserArrays, tasks: BatchTasks, decay: np.ndarray,
          rule: GradientSteps | PrototypeShift, residual: GradientSteps | PrototypeShift,
          out: Served) -> None:
    """Run a micro-batch's ops in stream order.

    A prediction writes ``out.p[i]`` and ``out.k[i]``; a label writes
    ``out.learn_phi[i]`` (the weights it met), joins the user's ring (in the store)
    and task, and the user is adapted by ``rule`` before their next prediction or
    at the end, each example weighted ``decay[age]``. So a user's consecutive
    labels are learned as one step, as a wave of them would be.

    A task with a ``prior`` (a user × context task's user) holds a residual: its
    weights are the prior's plus its own row, which ``residual`` adapts on the
    task's own labels (towards zero, not φ_0). The prior is adapted before any
    prediction of its user, in any context, as it would be with no finer tasks.
    """
    rows, kind, label, q, base = ops.rows, ops.kind, ops.label, ops.q, ops.base
    task_of, item, context = ops.task_of, ops.item, ops.context
    prior, prior_task = ops.prior, ops.prior_task
    phi, learned = users.phi, users.learned
    ring_item, ring_context, ring_label = users.ring_item, users.ring_context, users.ring_label
    task_rows, task_q, task_base, task_y, task_mask = (tasks.rows, tasks.q, tasks.base, tasks.y,
                                                       tasks.mask)
    task_prior = tasks.prior
    p, k, learn_phi = out.p, out.k, out.learn_phi
    stale = np.zeros(task_rows.shape[0], dtype=np.bool_)
    weight = np.empty(task_q.shape[1], dtype=np.float32)
    shifted = np.empty(task_q.shape[1], dtype=np.float32)
    ring = ring_item.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        j = task_of[i]
        pr = prior[i]
        if kind[i] == PREDICT:
            z = base[i]
            if pr >= 0:
                jp = prior_task[i]
                if jp >= 0 and stale[jp]:
                    _recency_weights(weight, task_mask[jp], decay, learned[pr])
                    adapt(rule, phi[pr], task_q[jp], task_base[jp], task_y[jp], weight,
                          learned[pr])
                    stale[jp] = False
                if j >= 0 and stale[j]:
                    _recency_weights(weight, task_mask[j], decay, learned[r])
                    _adapt_residual(residual, phi[r], phi[pr], task_q[j], task_base[j],
                                    task_y[j], weight, learned[r], shifted)
                    stale[j] = False
                z = _logit(phi[pr], q[i], z)
            elif j >= 0 and stale[j]:
                _recency_weights(weight, task_mask[j], decay, learned[r])
                adapt(rule, phi[r], task_q[j], task_base[j], task_y[j], weight, learned[r])
                stale[j] = False
            p[i] = _sigmoid(_logit(phi[r], q[i], z))
            k[i] = learned[r]
            continue
        learn_phi[i] = phi[r]
        if pr >= 0:
            learn_phi[i] += phi[pr]
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
    # priors first: a residual is adapted against its prior's weights as they end
    for j in range(task_rows.shape[0]):
        if stale[j] and task_prior[j] < 0:
            r = task_rows[j]
            _recency_weights(weight, task_mask[j], decay, learned[r])
            adapt(rule, phi[r], task_q[j], task_base[j], task_y[j], weight, learned[r])
    for j in range(task_rows.shape[0]):
        if stale[j] and task_prior[j] >= 0:
            r = task_rows[j]
            _recency_weights(weight, task_mask[j], decay, learned[r])
            _adapt_residual(residual, phi[r], phi[task_prior[j]], task_q[j], task_base[j],
                            task_y[j], weight, learned[r], shifted)


# -- representation ----------------------------------------------------------------------


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
def represent(ids: ExampleIds, theta: ThetaArrays, out: Represented) -> None:
    """:func:`metarec.model.represent` for ``n`` examples: writes ``out``."""
    item, item_feats, user_feats = ids.item, ids.item_feats, ids.user_feats
    item_emb, item_bias = theta.item_emb, theta.item_bias
    feat_emb, feat_bias = theta.feat_emb, theta.feat_bias
    q, base, side = out.q, out.base, out.side
    d = q.shape[1]
    global_bias = np.float64(theta.global_bias[0])  # the biases add up in float64
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
def predict(ids: ExampleIds, theta: ThetaArrays, phi: np.ndarray, out: np.ndarray) -> None:
    """Click probabilities of ``n`` examples under one user's ``phi``: each example
    represented as :func:`represent` does and scored as :func:`serve` does, in one
    pass (a server's scores equal the consumer's predictions)."""
    d = theta.item_emb.shape[1]
    rep = Represented(np.empty((1, d), dtype=np.float32), np.empty(1, dtype=np.float32),
                      np.empty((1, d), dtype=np.float32))
    for i in range(ids.item.shape[0]):
        one = ExampleIds(ids.item[i:i + 1], ids.item_feats[i:i + 1], ids.user_feats[i:i + 1])
        represent(one, theta, rep)
        out[i] = _sigmoid(_logit(phi, rep.q[0], rep.base[0]))


# -- θ's online step ---------------------------------------------------------------------


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
                  grad: np.ndarray, touched: np.ndarray, rows: np.ndarray, lr: float,
                  eps: float) -> None:
    """Adagrad on ``rows`` of a table and its bias (``grad``'s last column); the
    gradient rows and touched-flags are left zero and False for the next batch."""
    d = table.shape[1]
    for r in rows:
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
def online_step(batch: LabelledBatch, theta: ThetaArrays, acc: AdagradArrays,
                scratch: Scratch, lr: float, eps: float) -> None:
    """θ's Adagrad step on the summed logistic loss of the batch's labelled examples,
    each scored with the fast weights it met; the gradient of
    :func:`metarec.model.represent` and :func:`~metarec.model.logit`, written out."""
    item, item_feats, user_feats = batch.ids.item, batch.ids.item_feats, batch.ids.user_feats
    q, side, err, phi = batch.q, batch.side, batch.err, batch.phi
    item_grad, feat_grad = scratch.item_grad, scratch.feat_grad
    item_touched, feat_touched = scratch.item_touched, scratch.feat_touched
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
    acc.global_bias[0] += g * g
    theta.global_bias[0] -= lr * g / (math.sqrt(acc.global_bias[0]) + eps)
    _adagrad_rows(theta.item_emb, theta.item_bias, acc.item_emb, acc.item_bias, item_grad,
                  item_touched, item_rows[:n_item], lr, eps)
    _adagrad_rows(theta.feat_emb, theta.feat_bias, acc.feat_emb, acc.feat_bias, feat_grad,
                  feat_touched, feat_rows[:n_feat], lr, eps)


def logits(phi: np.ndarray, q: np.ndarray, base: np.ndarray) -> np.ndarray:
    """:func:`metarec.model.logit` in numpy: ``phi`` n x (d+1), ``q`` n x d, ``base`` n."""
    return base + phi[:, -1] + np.einsum("nd,nd->n", phi[:, :-1], q)
