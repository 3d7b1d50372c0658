"""Meta-learning θ from many users' tasks: the algorithms behind one interface
(:class:`MetaLearner`, one module each, :data:`META_LEARNERS` by
:class:`Algorithm`) and the trainer that schedules and applies their updates.

A task is one user's buffered examples in time order; the gradient-based
algorithms adapt on the earlier half (support) and are scored on the later half
(query), so the meta-objective is exactly the streaming situation: adapt on what
a user did, be scored on what they do next. By default users are adapted as
serving adapts them, each example weighted by its recency (:func:`inner_weights`).
"""

from metarec.meta.anil import ANIL
from metarec.meta.base import MetaDirection, MetaLearner, inner_weights, split_masks
from metarec.meta.config import Algorithm, InnerWeights, MetaConfig
from metarec.meta.finetune import FineTune
from metarec.meta.fomaml import FOMAML
from metarec.meta.maml import MAML
from metarec.meta.metasgd import MetaSGD
from metarec.meta.registry import META_LEARNERS, meta_learner
from metarec.meta.reptile import Reptile
from metarec.meta.schedule import MetaSchedule
from metarec.meta.trainer import MetaReport, MetaTrainer

__all__ = [
    "ANIL",
    "FOMAML",
    "MAML",
    "META_LEARNERS",
    "Algorithm",
    "FineTune",
    "InnerWeights",
    "MetaConfig",
    "MetaDirection",
    "MetaLearner",
    "MetaReport",
    "MetaSGD",
    "MetaSchedule",
    "MetaTrainer",
    "Reptile",
    "inner_weights",
    "meta_learner",
    "split_masks",
]
