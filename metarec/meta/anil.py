"""ANIL (Raghu et al. 2020, "Almost No Inner Loop"): adapt only the network's head
in the inner loop; learn the body, and the head's initialisation, in the outer
loop through that head-only inner loop.

In this model the head is φ_u (the user's d+1 weights on top of the shared
representation ``q``, ``base``) and the body is the rest of θ (the embedding
tables and the global bias). :class:`~metarec.meta.maml.MAML` here already adapts
only φ_u per user (a per-user copy of the tables is what the model avoids), and
differentiates the query loss through that inner loop into φ_0 and the body. That
is ANIL's computation exactly: the same loss and the same gradients, so
``Algorithm.ANIL`` is MAML under the name the literature gives to what it is, and
a test holds its direction identical to MAML's. A MAML that also adapted the
body per user would be the one to differ, and this model has none.
"""

from __future__ import annotations

from metarec.meta.maml import MAML


class ANIL(MAML):
    """:class:`~metarec.meta.maml.MAML`'s update: see the module's docstring."""
