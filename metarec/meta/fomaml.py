"""First-order MAML: MAML's query loss with the inner gradients held constant, so
the derivative skips the inner loop's second derivatives."""

from __future__ import annotations

from metarec.meta.objective import QueryLoss


class FOMAML(QueryLoss):
    first_order = True
