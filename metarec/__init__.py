"""metarec: the learning core of a streaming meta-learning recommender (no Kafka).

The usual entry point is the stream session: raw records in; predictions, dead
letters, meta-updates, drift alarms, model snapshots and a status out::

    from metarec import Record, SessionConfig, StreamSession

    session = StreamSession(SessionConfig())
    out = session.process([Record(b'{"type": "impression", ...}')])
    final = session.finish()  # the end of a finite log: every window closes

Every exception metarec raises on purpose derives from :class:`MetarecError`.
"""

from metarec.drift import DriftConfig, DriftEvent, DriftMonitor
from metarec.errors import MetarecError
from metarec.evaluation import Prequential, auc, logloss
from metarec.events import Click, Impression, Rejected, decode_event
from metarec.joiner import JoinConfig, Joiner
from metarec.learner import LEARN, PREDICT, LearnerConfig, OnlineLearner, Ops, Scores
from metarec.meta import Algorithm, MetaConfig
from metarec.model import ModelConfig
from metarec.ordering import OrderConfig
from metarec.predictions import Prediction, Predictions
from metarec.records import DeadLetter, Record
from metarec.session import (
    ModelSnapshot,
    SessionConfig,
    SessionOutput,
    SessionStatus,
    StreamSession,
)

__all__ = [
    "LEARN",
    "PREDICT",
    "Algorithm",
    "Click",
    "DeadLetter",
    "DriftConfig",
    "DriftEvent",
    "DriftMonitor",
    "Impression",
    "JoinConfig",
    "Joiner",
    "LearnerConfig",
    "MetaConfig",
    "MetarecError",
    "ModelConfig",
    "ModelSnapshot",
    "OnlineLearner",
    "Ops",
    "OrderConfig",
    "Prediction",
    "Predictions",
    "Prequential",
    "Record",
    "Rejected",
    "Scores",
    "SessionConfig",
    "SessionOutput",
    "SessionStatus",
    "StreamSession",
    "auc",
    "decode_event",
    "logloss",
]
