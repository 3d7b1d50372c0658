"""Each :class:`~metarec.meta.config.Algorithm` and the module that implements it."""

from __future__ import annotations

from collections.abc import Callable

from metarec.meta.anil import ANIL
from metarec.meta.base import MetaLearner
from metarec.meta.config import Algorithm, MetaConfig
from metarec.meta.finetune import FineTune
from metarec.meta.fomaml import FOMAML
from metarec.meta.maml import MAML
from metarec.meta.metasgd import MetaSGD
from metarec.meta.reptile import Reptile
from metarec.model import ModelConfig

META_LEARNERS: dict[Algorithm, Callable[[ModelConfig, MetaConfig], MetaLearner]] = {
    Algorithm.MAML: MAML,
    Algorithm.FOMAML: FOMAML,
    Algorithm.REPTILE: Reptile,
    Algorithm.METASGD: MetaSGD,
    Algorithm.ANIL: ANIL,
    Algorithm.FINETUNE: FineTune,
}


def meta_learner(model: ModelConfig, meta: MetaConfig) -> MetaLearner:
    """The algorithm ``meta`` names, for this model."""
    return META_LEARNERS[meta.algorithm](model, meta)
