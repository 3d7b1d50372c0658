"""All settings, defined once, as nested models; each is a flag and an environment
variable.

The learning, joining, ordering and drift settings are the core's own models
(:class:`metarec.session.SessionConfig` and what it nests); this module adds the
Kafka, replay, publishing and operations sections. Every leaf has one flat name,
made from its field name and its section's prefix (``meta_`` for the
meta-learner, ``drift_`` for drift, ``replay_`` for replay), so ``--inner-steps 3``
and ``METAREC_INNER_STEPS=3`` set ``session.learner.model.inner_steps``. A flag
wins over the environment, which wins over the default; the nested form
``METAREC_SESSION__LEARNER__MODEL__INNER_STEPS`` works as well (the flat name wins
if both are set). Names are case-insensitive.
"""

from __future__ import annotations

import enum
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from metarec.drift import DriftConfig
from metarec.meta import MetaConfig
from metarec.session import SessionConfig
from streamer.errors import ConfigError

ENV_PREFIX = "METAREC_"
#: Kafka's default of 500 ms throttles a consumer of small fetches
FETCH_MAX_WAIT_MS = 10


class KafkaSettings(BaseModel):
    """Where the records are, and how the group member reads them."""

    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...); none: start the embedded "
        "broker (run) or fail (produce, model pull)")
    events_topic: str = Field("metarec.events", description="topic of impression/click events")
    model_topic: str = Field("metarec.model", description="topic of published model versions")
    dlq_topic: str = Field("metarec.events.dlq", description="dead-letter topic for bad records")
    drift_topic: str = Field("metarec.drift", description="topic of drift alarm records (run)")
    group_id: str = Field("metarec", description="consumer group id")
    partitions: int = Field(4, ge=1, description="partitions of the events topic if created")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="consumer group session timeout; brokers finish a join in "
        "about half of it on first start")
    poll_timeout_ms: int = Field(200, ge=1, description="how long a poll waits for records")
    fetch_max_wait_ms: int = Field(
        FETCH_MAX_WAIT_MS, ge=0, description="how long the broker may hold a group "
        "member's fetch to fill it (Kafka's default of 500 ms throttles a consumer of small "
        "fetches)")
    max_batch_wait_ms: int = Field(
        1000, ge=0, description="run: learn a micro-batch short of max_batch_records once its "
        "first event has waited this long (micro-batch size moves θ's steps: whole ones "
        "learn as a replay does)")
    max_poll_records: int = Field(
        1000, ge=1, description="run: records one poll may return; the session cuts them "
        "into micro-batches, so this moves no learning, and more per poll spreads the "
        "loop's cost per poll over more records")
    max_buffered_records: int = Field(
        5000, ge=1, description="run: pause a partition holding this many records for the "
        "event-time merge, until it holds half as many")
    commit_interval_ms: int = Field(
        1000, ge=0, description="commit offsets after the first micro-batch this long after "
        "the last commit (0: after every one), and at shutdown; a crash or rebalance "
        "re-reads at most this much")
    durable_state: bool = Field(
        True, description="run: keep users' state on the changelog topic and θ's changes on "
        "the updates topic, committed with the offsets in one Kafka transaction (a crash "
        "loses nothing and learns nothing twice); off: state in memory, at-least-once")
    changelog_topic: str | None = Field(
        None, description="compacted topic of users' state, partitioned like the events "
        "topic; default: <group id>.state")
    updates_topic: str | None = Field(
        None, description="topic of θ's changes from every group member (one partition); "
        "default: <group id>.updates")
    instance_id: str | None = Field(
        None, description="this member's stable name in the group (its Kafka transactional "
        "id; a restart under the same name aborts what it left open); default: the host name")
    stalled_transaction_seconds: float = Field(
        10.0, gt=0, description="a transaction open this long on a topic being restored is "
        "taken to be a dead member's, and aborted (some brokers never time one out)")

    def changelog(self) -> str:
        return self.changelog_topic or f"{self.group_id}.state"

    def updates(self) -> str:
        return self.updates_topic or f"{self.group_id}.updates"

    def transactional_id(self) -> str:
        return f"{self.group_id}.{self.instance_id or socket.gethostname()}"


class SecurityProtocol(enum.StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(enum.StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"
    OAUTHBEARER = "OAUTHBEARER"


def read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret's current value: its variable, or its file without the trailing
    newline (read each time: a rotated secret file is picked up)."""
    if value is not None:
        return value.get_secret_value()
    return None if file is None else file.read_text().rstrip("\r\n")


def _file_problems(model: BaseModel, secrets: dict[str, str], files: tuple[str, ...],
                   flat_prefix: str = "") -> Iterator[str]:
    """A secret given both ways, and files that cannot be read. ``secrets``: each
    secret field and the field of its file; ``files``: the other file fields."""
    for secret, file in secrets.items():
        if getattr(model, secret) is not None and getattr(model, file) is not None:
            yield (f"give METAREC_{(flat_prefix + secret).upper()} or "
                   f"--{(flat_prefix + file).replace('_', '-')}, not both")
    for name in (*secrets.values(), *files):
        path = getattr(model, name)
        if path is not None and not os.access(path, os.R_OK):
            yield f"--{(flat_prefix + name).replace('_', '-')}: cannot read {path}"


class SecuritySettings(BaseModel):
    """How every Kafka client connects: TLS, SASL and their credentials."""

    security_protocol: SecurityProtocol = Field(
        SecurityProtocol.PLAINTEXT, description="how clients talk to the brokers: PLAINTEXT, "
        "SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)")
    sasl_mechanism: SaslMechanism | None = Field(
        None, description="SASL mechanism (SASL_* protocols): PLAIN, SCRAM-SHA-256, "
        "SCRAM-SHA-512 or OAUTHBEARER")
    sasl_username: str | None = Field(None, description="SASL user (PLAIN, SCRAM-*)")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password: only from the environment, or the file of "
        "--sasl-password-file")
    sasl_password_file: Path | None = Field(
        None, description="file holding the SASL password (or METAREC_SASL_PASSWORD); read "
        "whenever a client connects, so a rotated secret is picked up")
    sasl_oauth_token_provider: str | None = Field(
        None, description="OAUTHBEARER: module:name of a token provider (a subclass of "
        "kafka.net.sasl.oauth.AbstractTokenProvider, made with no arguments, or an instance)")
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CAs that sign the brokers' certificates (default: "
        "the system's)")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of the client "
                                     "certificate")
    ssl_key_password: SecretStr | None = Field(
        None, description="password of an encrypted client key: only from the environment, or "
        "the file of --ssl-key-password-file")
    ssl_key_password_file: Path | None = Field(
        None, description="file holding the client key's password (or METAREC_SSL_KEY_PASSWORD)")
    ssl_check_hostname: bool = Field(
        True, description="check that a broker's certificate names the host connected to")
    connect_timeout_seconds: float = Field(
        15.0, gt=0, le=600, description="at start-up, fail (exit code 4) when the cluster has "
        "not been reached, trusted and authenticated to within this long")

    @property
    def tls(self) -> bool:
        return self.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    @property
    def sasl(self) -> bool:
        return self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT,
                                          SecurityProtocol.SASL_SSL)

    @model_validator(mode="after")
    def _consistent(self) -> SecuritySettings:
        problems = [*self._sasl_problems(), *_file_problems(
            self, {"sasl_password": "sasl_password_file",
                   "ssl_key_password": "ssl_key_password_file"},
            ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))]
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            problems.append("--ssl-keyfile needs --ssl-certfile")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _sasl_problems(self) -> Iterator[str]:
        if not self.sasl:
            if self.sasl_mechanism is not None:
                yield (f"--sasl-mechanism needs a SASL --security-protocol (SASL_SSL or "
                       f"SASL_PLAINTEXT), not {self.security_protocol.value}")
            return
        if self.sasl_mechanism is None:
            yield f"--security-protocol {self.security_protocol.value} needs --sasl-mechanism"
        elif self.sasl_mechanism is SaslMechanism.OAUTHBEARER:
            if not self.sasl_oauth_token_provider:
                yield "--sasl-mechanism OAUTHBEARER needs --sasl-oauth-token-provider"
        else:
            if not self.sasl_username:
                yield f"--sasl-mechanism {self.sasl_mechanism.value} needs --sasl-username"
            if self.sasl_password is None and self.sasl_password_file is None:
                yield (f"--sasl-mechanism {self.sasl_mechanism.value} needs a password: "
                       "METAREC_SASL_PASSWORD or --sasl-password-file")

    def password(self) -> str | None:
        return read_secret(self.sasl_password, self.sasl_password_file)

    def key_password(self) -> str | None:
        return read_secret(self.ssl_key_password, self.ssl_key_password_file)


class ReplaySettings(BaseModel):
    """What part of a historical log to replay, how fast, and where its outputs go."""

    from_time: float | None = Field(
        None, description="first event time (seconds since the epoch); on a topic also where "
        "reading starts (by record timestamp)")
    to_time: float | None = Field(None, description="event time to stop before")
    from_offset: int | None = Field(None, ge=0, description="replay of a topic: first offset, "
                                    "in every partition")
    to_offset: int | None = Field(None, ge=0, description="replay of a topic: offset to stop "
                                  "before, in every partition")
    speed: float | None = Field(None, gt=0, description="replay at N x event time (default: "
                                "as fast as possible)")
    model_version: int | None = Field(None, ge=1, description="replay: start from this "
                                      "version on the model topic (default: fresh)")
    models_out: str | None = Field(None, description="replay: write model versions to a "
                                   "directory, or to kafka:TOPIC")
    drift_out: Path | None = Field(None, description="replay: write drift alarms (JSONL)")

    def event_times(self) -> tuple[float, float]:
        """The event-time range of ``--from``/``--to`` ([-inf, inf) without them)."""
        return (-math.inf if self.from_time is None else self.from_time,
                math.inf if self.to_time is None else self.to_time)


class PublishSettings(BaseModel):
    """When model versions are published."""

    publish_every: int = Field(5, ge=1, description="publish a model version every N "
                               "meta-updates (and at shutdown)")
    publish_min_seconds: float = Field(
        10.0, ge=0, description="run: at most one model version per this many seconds "
        "(a version is 12 MB of θ to compress and send; replays publish by count only)")
    model_chunk_bytes: int = Field(900_000, ge=1024, le=900_000,
                                   description="model-topic chunk size (Kafka's default "
                                   "message limit is 1 MB)")


class OperationSettings(BaseModel):
    """Outputs, endpoints and the process itself."""

    predictions_out: Path | None = Field(None, description="write the prediction log (JSONL)")
    metrics_port: int = Field(9108, ge=0, description="Prometheus /metrics port (0: off)")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds")
    idle_exit_seconds: float | None = Field(
        None, gt=0, description="stop after this long without records (default: run forever; "
        "the embedded demo stops after 10 s)")
    demo_source: str | None = Field(
        "movielens-100k", description="with the embedded broker, stream this source into the "
        "events topic (empty: none)")
    log_every_seconds: float = Field(5.0, gt=0, description="progress log interval")
    shutdown_timeout_seconds: float = Field(
        30.0, gt=0, description="run: after SIGTERM/SIGINT, exit within this long even if "
        "Kafka cannot take the last model version or commit (exit code 3; the records "
        "since the last commit are read again)")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads (the tensors are "
                               "small; more threads mostly contend with the Kafka client)")


class ServeSettings(BaseModel):
    """``metarec serve``: the HTTP API over the users' live models."""

    host: str = Field("127.0.0.1", description="serve: address the HTTP API binds (0.0.0.0: "
                      "every interface, as in a container)")
    port: int = Field(8000, ge=1, le=65535, description="serve: port of the HTTP API (and "
                      "of its /metrics)")
    max_candidates: int = Field(1000, ge=1, description="serve: candidates one request may "
                                "score at most (more: 422)")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="serve: larger request "
                                   "bodies are refused (413)")
    poll_ms: int = Field(50, ge=1, description="serve: how long one poll of the topics waits "
                         "for records (the server's part of a label's delay to its scores)")
    tls_certfile: Path | None = Field(
        None, description="serve: PEM certificate (chain) to serve HTTPS with; with "
        "--serve-tls-keyfile")
    tls_keyfile: Path | None = Field(None, description="serve: PEM private key of "
                                     "--serve-tls-certfile")
    token: SecretStr | None = Field(
        None, description="serve: bearer token every /v1 request must carry (Authorization: "
        "Bearer ...); only from the environment, or the file of --serve-token-file")
    token_file: Path | None = Field(
        None, description="serve: file holding the API's bearer token (or METAREC_SERVE_TOKEN)")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        problems = list(_file_problems(self, {"token": "token_file"},
                                       ("tls_certfile", "tls_keyfile"), "serve_"))
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            problems.append("--serve-tls-certfile and --serve-tls-keyfile go together")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def api_token(self) -> str | None:
        return read_secret(self.token, self.token_file)


#: the prefix of each section's flat names
PREFIXES: dict[type[BaseModel], str] = {MetaConfig: "meta_", DriftConfig: "drift_",
                                        ReplaySettings: "replay_", ServeSettings: "serve_"}
#: flat names that are not prefix + field name (the short names operators know)
FLAT_NAMES = {
    ("session", "learner", "meta", "algorithm"): "algorithm",
    ("session", "learner", "meta", "every_examples"): "meta_every",
    ("session", "learner", "meta", "users_per_update"): "meta_users",
    ("replay", "from_time"): "replay_from",
    ("replay", "to_time"): "replay_to",
    ("replay", "model_version"): "model_version",
    ("replay", "models_out"): "models_out",
    ("replay", "drift_out"): "drift_out",
}


@dataclass(frozen=True)
class Leaf:
    """One setting: where it sits in :class:`Settings`, its flat name, its field."""

    path: tuple[str, ...]
    name: str
    field: FieldInfo

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _leaves(model: type[BaseModel], path: tuple[str, ...]) -> Iterator[Leaf]:
    prefix = PREFIXES.get(model, "")
    for name, info in model.model_fields.items():
        here = (*path, name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, here)
        else:
            yield Leaf(here, FLAT_NAMES.get(here, prefix + name), info)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat names and values as the nested mapping :class:`Settings` takes."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        leaf = LEAVES.get(name)
        if leaf is None:
            raise ConfigError(f"no setting is named {name!r}")
        node = out
        for part in leaf.path[:-1]:
            node = node.setdefault(part, {})
        node[leaf.path[-1]] = value
    return out


class _FlatEnvironment(PydanticBaseSettingsSource):
    """``METAREC_<FLAT NAME>`` variables."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the whole mapping comes from __call__

    def __call__(self) -> dict[str, Any]:
        # case-insensitive, as pydantic-settings reads the nested form
        env = {key.upper(): value for key, value in os.environ.items()
               if key.upper().startswith(ENV_PREFIX)}
        return nest({name: env[leaf.env] for name, leaf in LEAVES.items() if leaf.env in env})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    session: SessionConfig = Field(default_factory=SessionConfig)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    ops: OperationSettings = Field(default_factory=OperationSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _FlatEnvironment(settings_cls), env_settings

    def redact(self, text: str) -> str:
        """``text`` with every secret of these settings replaced by ``***`` (for
        messages that quote a client, a broker or an exception)."""
        for read in (self.security.password, self.security.key_password,
                     self.serve.api_token):
            try:
                secret = read()
            except OSError:  # a secret file gone since start-up: nothing to hide of it
                continue
            if secret:
                text = text.replace(secret, "***")
        return text

    @classmethod
    def of(cls, **flat: Any) -> Settings:
        """Settings from flat names (``Settings.of(inner_steps=3)``), over the
        environment and the defaults."""
        return cls(**nest(flat))

    def with_flat(self, **flat: Any) -> Settings:
        """A copy with some settings changed, by flat name (validated)."""
        data = self.model_dump()
        _deep_update(data, nest(flat))
        return type(self).model_validate(data)


def _deep_update(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def _index() -> dict[str, Leaf]:
    out: dict[str, Leaf] = {}
    for leaf in _leaves(Settings, ()):
        if leaf.name in out:
            raise TypeError(f"two settings are named {leaf.name!r}: "
                            f"{'.'.join(out[leaf.name].path)} and {'.'.join(leaf.path)}")
        if not leaf.field.description:
            raise TypeError(f"setting {'.'.join(leaf.path)} has no description")
        out[leaf.name] = leaf
    return out


#: every setting by flat name
LEAVES = _index()
