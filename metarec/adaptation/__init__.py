"""How a user's fast weights φ_u follow their task, behind one interface
(:class:`UserAdaptation`), one module per way; :func:`user_adaptation` picks the
one a :class:`~metarec.model.ModelConfig` names."""

from __future__ import annotations

from collections.abc import Callable

from metarec.adaptation.base import Rule, UserAdaptation
from metarec.adaptation.gradient import GradientAdaptation
from metarec.adaptation.prototype import PrototypeAdaptation
from metarec.model import Adaptation, ModelConfig

ADAPTATIONS: dict[Adaptation, Callable[[ModelConfig], UserAdaptation]] = {
    Adaptation.GRADIENT: GradientAdaptation,
    Adaptation.PROTOTYPE: PrototypeAdaptation,
}


def user_adaptation(config: ModelConfig) -> UserAdaptation:
    return ADAPTATIONS[config.adaptation](config)


__all__ = ["ADAPTATIONS", "GradientAdaptation", "PrototypeAdaptation", "Rule",
           "UserAdaptation", "user_adaptation"]
