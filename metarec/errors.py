"""The learning core's exceptions: one root, so callers can catch all of metarec's own."""


class MetarecError(Exception):
    """Root of the exceptions metarec raises on purpose."""
