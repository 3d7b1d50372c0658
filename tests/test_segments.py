"""Initialisations by segment: with ``init_segment``, a new user starts at φ_0 plus
a meta-learned offset for the value of one of their features, and meta-updates
move each segment's offset by what its own users adapt to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.features import Segments
from metarec.learner import LEARN, PREDICT, LearnerConfig, OnlineLearner, Ops
from metarec.meta import Algorithm, MetaConfig
from metarec.model import SEGMENT_INIT, ModelConfig, init_theta, theta_shapes

MODEL = ModelConfig(dim=4, init_segment="occupation", init_segment_buckets=16)


def test_a_segment_is_the_features_value_hashed_and_0_without_it() -> None:
    seg = Segments("occupation", 16)
    a, b = seg.of({"occupation": "artist"}), seg.of({"occupation": "doctor", "age": 30})
    assert 1 <= a < 16 and 1 <= b < 16 and a != b
    assert seg.of({"occupation": "artist", "age": 20}) == a
    assert seg.of({"age": 20}) == 0 and Segments(None, 16).of({"occupation": "artist"}) == 0


def test_theta_has_the_offsets_only_with_a_segment_feature() -> None:
    assert theta_shapes(MODEL)[SEGMENT_INIT] == (16, 5)
    assert SEGMENT_INIT not in theta_shapes(ModelConfig(dim=4))
    assert SEGMENT_INIT not in init_theta(ModelConfig(dim=4), 0)


def ops(users: list[str], segment: list[int], kind: list[int], label: list[float],
        item: list[int]) -> Ops:
    n, spec = len(users), MODEL.features
    return Ops(user=users, kind=np.array(kind), item=np.array(item),
               item_feats=np.zeros((n, spec.item_slots), dtype=np.int64),
               user_feats=np.zeros((n, spec.user_slots), dtype=np.int64),
               context=np.zeros((n, spec.context_slots), dtype=np.int64),
               label=np.array(label, dtype=np.float32), segment=np.array(segment))


def test_a_new_user_starts_at_phi0_plus_their_segments_offset() -> None:
    learner = OnlineLearner(LearnerConfig(model=MODEL))
    offsets = learner.theta[SEGMENT_INIT]
    offsets[3], offsets[5] = 0.5, -0.25
    learner.process(ops(["a", "b", "c"], [3, 5, 0], [PREDICT] * 3, [0.0] * 3, [1, 2, 3]))
    users, phi0 = learner.users, learner.theta["phi0"].numpy()
    np.testing.assert_allclose(users.phi[users.rows["a"]], phi0 + 0.5)
    np.testing.assert_allclose(users.phi[users.rows["b"]], phi0 - 0.25)
    np.testing.assert_allclose(users.phi[users.rows["c"]], phi0)  # no segment: φ_0


@pytest.mark.parametrize("algorithm", [Algorithm.REPTILE, Algorithm.FOMAML, Algorithm.MAML])
def test_meta_updates_move_each_segments_start_towards_its_own_users(
        algorithm: Algorithm) -> None:
    """Users of segment 3 click everything, those of segment 5 nothing, those without
    the feature half of it: the segments' starting biases part, in the directions of
    their users, and row 0 (no segment) stays zero."""
    meta = MetaConfig(algorithm=algorithm, every_examples=10**9, users_per_update=64,
                      min_task=4, lr=0.05)
    learner = OnlineLearner(LearnerConfig(model=MODEL, meta=meta, task_size=10))
    rng = np.random.default_rng(0)
    users, segment, labels = [], [], []
    for u in range(60):
        seg = (3, 5, 0)[u % 3]
        for _ in range(8):
            users.append(f"u{u}")
            segment.append(seg)
            labels.append({3: 1.0, 5: 0.0, 0: float(rng.random() < 0.5)}[seg])
    n = len(users)
    learner.process(ops(users, segment, [LEARN] * n, labels, list(rng.integers(1, 50, n))))
    for _ in range(20):
        assert learner.meta_update() is not None
    offsets = learner.theta[SEGMENT_INIT]
    bias = MODEL.dim
    assert offsets[3, bias] > 0.05 and offsets[5, bias] < -0.05
    assert torch.count_nonzero(offsets[0]) == 0
    untouched = [r for r in range(16) if r not in (0, 3, 5)]
    assert torch.count_nonzero(offsets[untouched]) == 0
