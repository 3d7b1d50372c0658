"""metarec: the learning core of a streaming meta-learning recommender (no Kafka).

The usual entry points::

    from metarec import LearnerConfig, OnlineLearner, decode_event
"""

from metarec.drift import DriftConfig, DriftEvent, DriftMonitor
from metarec.evaluation import Prequential, auc, logloss
from metarec.events import Click, Impression, Rejected, decode_event
from metarec.joiner import Joiner
from metarec.learner import LEARN, PREDICT, LearnerConfig, OnlineLearner, Ops, Scores
from metarec.meta import Algorithm, MetaConfig
from metarec.model import ModelConfig

__all__ = [
    "LEARN",
    "PREDICT",
    "Algorithm",
    "Click",
    "DriftConfig",
    "DriftEvent",
    "DriftMonitor",
    "Impression",
    "Joiner",
    "LearnerConfig",
    "MetaConfig",
    "ModelConfig",
    "OnlineLearner",
    "Ops",
    "Prequential",
    "Rejected",
    "Scores",
    "auc",
    "decode_event",
    "logloss",
]
