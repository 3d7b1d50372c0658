"""The streamer's exceptions, under the core's root."""

from metarec.errors import MetarecError


class StreamerError(MetarecError):
    """Root of the exceptions the streamer raises on purpose."""


class SourceError(StreamerError, ValueError):
    """A source that cannot be read: the message names it and says why (exit code 2)."""


class MissingTopicError(StreamerError, LookupError):
    """A topic that does not exist on the cluster."""


class ConfigError(StreamerError, ValueError):
    """A setting that does not exist."""


class EmbeddedBrokerError(StreamerError, RuntimeError):
    """The embedded broker did not start or does not answer."""


class ModelTopicError(StreamerError, ValueError):
    """A model version that cannot be written within the topic's message limit."""


class ClusterAccessError(StreamerError, RuntimeError):
    """The Kafka cluster refuses this client: an untrusted certificate, the wrong
    protocol, a refused login (exit code 4; retrying will not help)."""


class ClusterUnreachableError(StreamerError, RuntimeError):
    """No bootstrap server was reached and answered in time (exit code 3)."""
