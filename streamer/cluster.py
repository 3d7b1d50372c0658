"""Where the Kafka cluster is and how to reach it: every Kafka client the project
creates (group member, producers, admin, topic readers, the model puller, the
server's follower) is made here, with the same TLS and SASL settings."""

from __future__ import annotations

import importlib
import ssl
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.net.sasl.oauth import AbstractTokenProvider

from streamer.config import SaslMechanism, SecuritySettings, Settings
from streamer.errors import ConfigError


@dataclass(frozen=True)
class Cluster:
    bootstrap: str
    security: SecuritySettings = field(default_factory=SecuritySettings)

    @classmethod
    def of(cls, settings: Settings) -> Cluster:
        if settings.kafka.bootstrap_servers is None:
            raise ConfigError("--bootstrap-servers (or METAREC_BOOTSTRAP_SERVERS) is needed")
        return cls(settings.kafka.bootstrap_servers, settings.security)

    def __str__(self) -> str:  # what logs name: never the credentials
        return f"{self.bootstrap} ({self.security.security_protocol.value})"

    def options(self) -> dict[str, Any]:
        """kafka-python's connection settings for one client (secrets read now)."""
        sec = self.security
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap,
                               "security_protocol": sec.security_protocol.value}
        if sec.tls:
            out["ssl_context"] = self.ssl_context()
        if sec.sasl and sec.sasl_mechanism is not None:
            out["sasl_mechanism"] = sec.sasl_mechanism.value
            if sec.sasl_mechanism is SaslMechanism.OAUTHBEARER:
                out["sasl_oauth_token_provider"] = self.token_provider
            else:
                out |= {"sasl_plain_username": sec.sasl_username,
                        "sasl_plain_password": sec.password()}
        return out

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of every client (and of the start-up check), made as
        kafka-python makes its own: TLS 1.2 or newer, the given CAs or the
        system's, the client certificate if any."""
        sec = self.security
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = sec.ssl_check_hostname
        try:
            if sec.ssl_cafile is not None:
                ctx.load_verify_locations(sec.ssl_cafile)
            else:
                ctx.load_default_certs()
            if sec.ssl_certfile is not None:
                ctx.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile, sec.key_password())
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the TLS files (--ssl-cafile, --ssl-certfile, "
                              f"--ssl-keyfile; a wrong key password?): {exc}") from None
        return ctx

    @cached_property
    def token_provider(self) -> AbstractTokenProvider:
        """The OAUTHBEARER token provider named by ``--sasl-oauth-token-provider``
        (one per cluster: it may cache its token)."""
        where = self.security.sasl_oauth_token_provider or ""
        module, _, name = where.partition(":")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"--sasl-oauth-token-provider {where!r}: cannot import it "
                              f"({type(exc).__name__}: {exc}); give module:name") from None
        provider = found() if isinstance(found, type) else found
        if not isinstance(provider, AbstractTokenProvider):
            raise ConfigError(f"--sasl-oauth-token-provider {where!r} is not a "
                              "kafka.net.sasl.oauth.AbstractTokenProvider")
        return provider

    def consumer(self, *topics: str, **config: Any) -> KafkaConsumer:
        return KafkaConsumer(*topics, **self.options(), **config)

    def producer(self, **config: Any) -> KafkaProducer:
        return KafkaProducer(**self.options(), **config)

    def admin(self, **config: Any) -> KafkaAdminClient:
        return KafkaAdminClient(**self.options(), **config)
