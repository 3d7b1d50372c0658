"""The server's model scores as the consumer predicts, from what the consumer makes
durable: θ at the last durable point plus its delta, and users' state values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metarec.datasets.synthetic import SyntheticStream
from metarec.encoding import Encoder
from metarec.learner import PREDICT
from metarec.live_model import LiveModel
from metarec.model import SEGMENT_INIT, segments
from metarec.records import Record
from metarec.session import StreamSession
from metarec.task_key import TaskKey
from metarec.theta_state import Delta, DeltaError
from streamer.config import Settings
from tests.helpers import small_settings

SETTINGS = small_settings()


def _events(ios_age: bool = False) -> list[dict[str, object]]:
    """``ios_age``: those who tell it give another age on ios (the features of a
    user's latest event are theirs, whatever the platform)."""
    events = list(SyntheticStream(users=120, events_per_user=12, seed=5).events())
    for e in events:  # some users tell their age group; the rest never do
        if int(str(e["user_id"])[1:]) % 3 == 0:
            e["user_features"] = {"age": f"a{int(str(e['user_id'])[1:]) % 5}"}
            if ios_age and e["context"]["platform"] == "ios":  # type: ignore[index]
                e["user_features"] = {"age": "a-ios"}
    return events


Learned = tuple[StreamSession, LiveModel, dict[str, tuple[bytes, int]]]


def _learned_session(settings: Settings = SETTINGS, ios_age: bool = False) -> Learned:
    """A consumer's session after a stream, and a live model fed what its durable
    point wrote: θ from before the stream plus the delta, and every user's value."""
    session = StreamSession(settings.session, durable=True, wall_clock=False)
    live = LiveModel(settings.session, {k: v.clone() for k, v in session.learner.theta.items()})
    session.process([Record(json.dumps(e).encode(), partition=0, offset=i)
                     for i, e in enumerate(_events(ios_age))])
    session.finish()
    point = session.checkpoint({0: 0})
    assert point.theta is not None
    live.apply_delta(Delta.loads(point.theta.dumps()))
    values = [(u, v, i) for i, (u, v) in enumerate(point.users[0])]
    decoded = live.decode_users(values)
    assert decoded.refused == 0
    live.set_users(decoded)
    return session, live, {u: (v, i) for u, v, i in values}


def _consumer_scores(session: StreamSession, user: str, items: list[tuple[str, dict[str, str]]],
                     context: dict[str, str],
                     user_features: dict[str, str] | None = None) -> np.ndarray:
    """What the consumer's learner predicts for these impressions now (predictions
    only: nothing is learned)."""
    from metarec.events import Impression

    imps = [Impression(type="impression", user_id=user, item_id=i, impression_id=f"x{n}",
                       timestamp=0.0, context=context, item_features=f,
                       user_features=user_features or {})
            for n, (i, f) in enumerate(items)]
    learner = session.config.learner
    encoder = Encoder(learner.model.features, task_key=TaskKey(learner.task_context),
                      segments=segments(learner.model))
    ops = encoder.encode(imps, [PREDICT] * len(imps), [0.0] * len(imps))
    return session.learner.process(ops).p


ITEMS = [(f"i{n}", {"category": f"c{n % 4}"}) for n in range(0, 100, 7)]


@pytest.fixture(scope="module")
def learned() -> Learned:
    return _learned_session()


@pytest.mark.parametrize("user", ["u3", "u10", "u77", "someone-new"])
def test_a_served_score_equals_the_consumers_prediction(
        learned: Learned, user: str) -> None:
    session, live, _ = learned
    context = {"platform": "ios", "region": "r1"}
    served = live.score(user, list(ITEMS), context=context)
    np.testing.assert_allclose(served.p, _consumer_scores(session, user, ITEMS, context),
                               rtol=0, atol=1e-6)
    assert served.known == (user != "someone-new")


@pytest.fixture(scope="module")
def learned_by_platform() -> Learned:
    return _learned_session(small_settings(task_context="platform"), ios_age=True)


@pytest.mark.parametrize(("user", "context"), [
    ("u3", {"platform": "ios"}), ("u3", {"platform": "web"}),
    ("u10", {"platform": "ios"}), ("u10", {"platform": "web", "region": "r1"}),
    ("u10", {"platform": "a-new-platform"}), ("u10", {}), ("someone-new", {"platform": "ios"})])
def test_with_a_task_key_a_served_score_equals_the_consumers_prediction(
        learned_by_platform: Learned, user: str, context: dict[str, str]) -> None:
    """In a platform the user has labels in, their task there scores; elsewhere (or
    with no platform) the user's own weights, from which a new task starts."""
    session, live, values = learned_by_platform
    served = live.score(user, list(ITEMS), context=context)
    np.testing.assert_allclose(served.p, _consumer_scores(session, user, ITEMS, context),
                               rtol=0, atol=1e-6)
    key = TaskKey("platform").of(user, context)
    finer = key != user and key in values
    assert finer == (user != "someone-new" and context.get("platform") in ("ios", "web"))


def test_a_new_user_is_served_from_the_start_of_their_segment() -> None:
    """With initialisations by segment (here the age group some users tell), a user
    without state is scored from their segment's start, as the consumer would
    score them; one who does not tell it, from φ_0."""
    session, live, _ = _learned_session(small_settings(init_segment="age"))
    assert live.theta[SEGMENT_INIT].abs().sum() > 0  # meta-updates moved the starts
    told, untold = {"age": "a2"}, {}
    for user, features in (("new-1", told), ("new-2", untold)):
        served = live.score(user, list(ITEMS), context={}, user_features=features)
        np.testing.assert_allclose(
            served.p, _consumer_scores(session, user, ITEMS, {}, features), rtol=0, atol=1e-6)


def test_personal_weights_move_scores_away_from_a_new_users(
        learned: Learned) -> None:
    _, live, _ = learned
    candidates = list(ITEMS)
    known = live.score("u10", candidates, context={"region": "r1"})
    fresh = live.score("nobody", candidates, context={"region": "r1"})
    assert known.k > 0 and fresh.k == 0
    assert np.abs(known.p - fresh.p).max() > 0.01


def test_an_item_without_features_is_scored_with_those_it_was_learned_with(
        learned: Learned) -> None:
    _, live, _ = learned
    real = next(e["item_features"] for e in _events() if e["item_id"] == "i7")
    given = live.score("u10", [("i7", real)])
    bare = live.score("u10", [("i7", {})])
    np.testing.assert_allclose(bare.p, given.p, rtol=0, atol=1e-7)


def test_an_older_value_never_replaces_a_newer_one() -> None:
    _, live, values = _learned_session()
    candidates = list(ITEMS)
    before, other = live.score("u10", candidates).p, live.score("u3", candidates).p
    assert not np.array_equal(before, other)
    theirs, mine = values["u3"][0], values["u10"][1]
    live.set_users(live.decode_users([("u10", theirs, mine - 1)]))  # older: ignored
    np.testing.assert_array_equal(live.score("u10", candidates).p, before)
    live.set_users(live.decode_users([("u10", theirs, mine + 1)]))
    np.testing.assert_array_equal(live.score("u10", candidates).p, other)


def test_damaged_values_and_deltas_are_refused_without_harm(
        learned: Learned) -> None:
    _, live, _ = learned
    candidates = list(ITEMS)
    before = live.score("u10", candidates).p
    decoded = live.decode_users([("u10", b"not a value", 10**9), ("x", b"MRU1" + b"\0" * 40, 1)])
    assert decoded.refused == 2 and not decoded.users
    live.set_users(decoded)
    bad = Delta(1, {"theta/item_emb": np.array([10**9])},
                {"theta/item_emb": np.zeros((1, 8), dtype=np.float32)})
    with pytest.raises(DeltaError):
        live.apply_delta(bad)
    np.testing.assert_array_equal(live.score("u10", candidates).p, before)


def test_a_server_holds_what_scoring_needs_and_no_task_rings(learned: Learned) -> None:
    session, live, _ = learned
    consumer = session.learner.users.bytes_per_user()
    phi = SETTINGS.session.learner.model.phi_dim * 4
    # fast weights, a label count, hashed features and a changelog position
    assert phi < live.bytes_per_user() <= phi + 8 + 4 * 4 + 8
    assert live.bytes_per_user() * 5 < consumer
