"""Which task an event belongs to: its user's, or its user's in one context.

A person's taste can differ by context: what they click in the app is not what
they click on the web. With a context field as the task key, each (user, value of
the field) is a task of its own. The user's own task stays as well: it learns from
all of the user's labels as with no task key, and is the prior of the
finer ones: a finer task's weights are the user's plus a residual of its own,
learned from its own labels and pulled towards zero. So a user seen on a new
platform is scored as the user, and a platform's own taste is learned on top.
"""

from __future__ import annotations

from collections.abc import Mapping

from metarec.events import FeatureValue

#: between the user id and the context in a finer task's key (a control character:
#: it does not occur in the ids of well-behaved producers)
SEPARATOR = "\x1f"


class TaskKey:
    """The task key of events: the user alone (``field`` None), or the user × the
    value of context ``field``."""

    def __init__(self, field: str | None):
        self.field = field

    def of(self, user_id: str, context: Mapping[str, FeatureValue]) -> str:
        """The key of the finer task, or ``user_id`` where the context lacks the field
        (the user's own task then serves the event)."""
        if self.field is None:
            return user_id
        value = context.get(self.field)
        if value is None:
            return user_id
        return f"{user_id}{SEPARATOR}{self.field}={value}"


__all__ = ["SEPARATOR", "TaskKey"]
