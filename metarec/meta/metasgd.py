"""Meta-SGD (Li et al. 2017): MAML that also learns a per-parameter inner learning
rate (θ's ``log_inner_lr``, kept as a log so the rates stay positive)."""

from __future__ import annotations

from metarec.meta.objective import QueryLoss


class MetaSGD(QueryLoss):
    learns: tuple[str, ...] = ("global_bias", "phi0", "log_inner_lr")
