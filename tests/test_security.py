"""Secured clusters: every command over TLS (with client certificates) against a
real TLS endpoint in front of the broker; a cluster that refuses us fails fast,
in one line that says why, with its own exit code; secrets never reach a flag,
a log line, an error message or a metric; the serving API's TLS and token."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from kafka.net.sasl.oauth import AbstractTokenProvider
from pydantic import ValidationError

from metarec.datasets.synthetic import SyntheticStream
from streamer.cli import EXIT_REFUSED, build_parser
from streamer.cluster import Cluster
from streamer.cluster_check import check
from streamer.config import SecuritySettings, Settings
from streamer.embedded import EmbeddedBroker, free_port
from streamer.errors import ClusterAccessError, ConfigError
from streamer.kafka_io import read_range
from streamer.runner import EXIT_KAFKA
from tests.helpers import closing_impressions, read_predictions, write_events
from tests.test_live_path import MODEL
from tests.tls import KEY_PASSWORD, TlsBroker

PASSWORD = "scram-pass-0b6d2f"
TOKEN = "api-token-5e8a91c3"
SECRETS = (PASSWORD, TOKEN, KEY_PASSWORD)


def metarec(*args: str, env: dict[str, str] | None = None, timeout: float = 240
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamer.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | (env or {}))


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# --- settings: secrets from the environment or a file, never a flag ------------------

def test_secrets_have_no_flag_and_help_shows_none_of_their_values(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("METAREC_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("METAREC_SERVE_TOKEN", TOKEN)
    for command in ("run", "serve", "produce", "replay"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        for flag in ("--sasl-password ", "--ssl-key-password ", "--serve-token "):
            assert flag not in text
        for flag in ("--security-protocol", "--sasl-mechanism", "--sasl-password-file",
                     "--ssl-cafile", "--no-ssl-check-hostname", "--serve-token-file"):
            assert flag in text
        assert_no_secret(text)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--sasl-password", PASSWORD])
    assert_no_secret(capsys.readouterr().err)


def test_a_secret_comes_from_its_variable_or_its_file_reread_on_every_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAREC_SASL_PASSWORD", PASSWORD)
    s = Settings.of(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                    sasl_username="metarec")
    options = Cluster("b:9093", s.security).options()
    assert options["sasl_plain_password"] == PASSWORD
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["security_protocol"] == "SASL_SSL"
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    monkeypatch.delenv("METAREC_SASL_PASSWORD")
    secret = tmp_path / "password"
    secret.write_text("first\n")  # as `kubectl create secret` and editors leave it
    cluster = Cluster("b:9093", Settings.of(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="metarec",
        sasl_password_file=secret).security)
    assert cluster.options()["sasl_plain_password"] == "first"
    secret.write_text("rotated")
    assert cluster.options()["sasl_plain_password"] == "rotated"


@pytest.mark.parametrize(("flat", "says"), [
    ({"security_protocol": "SASL_SSL"}, "--security-protocol SASL_SSL needs --sasl-mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256"},
     "needs --sasl-username"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
     "needs a password: METAREC_SASL_PASSWORD or --sasl-password-file"),
    ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN"}, "needs a SASL --security-protocol"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
     "needs --sasl-oauth-token-provider"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
     "--ssl-cafile: cannot read /nonexistent/ca.pem"),
    ({"security_protocol": "SSL", "ssl_keyfile": __file__}, "--ssl-keyfile needs --ssl-certfile"),
    ({"serve_tls_certfile": __file__}, "--serve-tls-certfile and --serve-tls-keyfile go together"),
])
def test_inconsistent_security_settings_are_refused_naming_the_flags(
        flat: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says.replace("(", r"\(")):
        Settings.of(**flat)


def test_an_invalid_setting_is_reported_without_echoing_a_secret() -> None:
    done = metarec("run", "--security-protocol", "SASL_SSL", "--bootstrap-servers", "x:1",
                   env={"METAREC_SASL_PASSWORD": PASSWORD, "METAREC_SERVE_TOKEN": TOKEN})
    assert done.returncode == 2
    assert "--security-protocol SASL_SSL needs --sasl-mechanism" in done.stderr
    assert_no_secret(done.stdout, done.stderr)


class StaticToken(AbstractTokenProvider):
    """An OAUTHBEARER token provider, as a user names one (module:name)."""

    def token(self) -> str:
        return "jwt"


TOKEN_PROVIDER = StaticToken()


def test_an_oauthbearer_token_provider_is_named_by_module_and_attribute() -> None:
    s = SecuritySettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                         sasl_oauth_token_provider="tests.test_security:TOKEN_PROVIDER")
    assert Cluster("b:9093", s).options()["sasl_oauth_token_provider"] is TOKEN_PROVIDER
    by_class = s.model_copy(update={"sasl_oauth_token_provider": "tests.test_security:StaticToken"})
    assert isinstance(Cluster("b:9093", by_class).options()["sasl_oauth_token_provider"],
                      StaticToken)
    for wrong in ("tests.test_security:nothing", "no.such.module:x",
                  "tests.test_security:PASSWORD"):
        with pytest.raises(ConfigError, match="--sasl-oauth-token-provider"):
            Cluster("b:9093", s.model_copy(update={"sasl_oauth_token_provider": wrong})).options()


# --- the real thing: a TLS endpoint that wants client certificates -----------------

def events() -> list[dict[str, Any]]:
    """Unlabelled impressions, clicks 5 s-10 min later, new users arriving; then
    impressions that close every attribution window (one partition)."""
    stream = list(SyntheticStream(users=30, events_per_user=6, prelabelled=False,
                                  click_delay=(5.0, 600.0), span_seconds=3600.0,
                                  session_gap_seconds=900.0, seed=5).events())
    return stream + [e for _, e in closing_impressions(stream, 1)]


def topic_flags(tag: str) -> list[str]:
    return ["--events-topic", f"ev-{tag}", "--model-topic", f"model-{tag}",
            "--dlq-topic", f"dlq-{tag}", "--drift-topic", f"drift-{tag}",
            "--group-id", f"group-{tag}", "--partitions", "1", "--publish-every", "1",
            "--publish-min-seconds", "0", "--meta-every", "50", "--meta-users", "8", *MODEL]


@pytest.mark.integration
def test_every_command_works_over_tls_and_no_output_holds_a_secret(
        tls: TlsBroker, tmp_path: Path) -> None:
    tag, outputs = uuid.uuid4().hex[:8], []
    flags = [*tls.flags(), *topic_flags(tag)]
    env = tls.env() | {"METAREC_LOG_LEVEL": "DEBUG"}
    source = write_events(tmp_path / "events.jsonl", events())

    produced = metarec("produce", str(source), *flags, env=env)
    outputs += [produced.stdout, produced.stderr]
    assert produced.returncode == 0, produced.stderr[-3000:]
    assert f"produced {len(events())} records" in produced.stderr
    bad = tls.cluster.producer()  # a record no schema accepts, from another client
    bad.send(f"ev-{tag}", key=b"u0", value=b"{not json")
    bad.flush()
    bad.close()

    predictions = tmp_path / "predictions.jsonl"
    ran = metarec("run", *flags, "--idle-exit-seconds", "6", "--metrics-port", "0",
                  "--predictions-out", str(predictions), env=env)
    outputs += [ran.stdout, ran.stderr]
    assert ran.returncode == 0, ran.stderr[-3000:]
    impressions = sum(e["type"] == "impression" and not e["user_id"].startswith("closer")
                      for e in events())
    logged = [p for p in read_predictions(predictions) if not p["user_id"].startswith("closer")]
    assert len(logged) == impressions  # every impression labelled, by clicks joined live

    dead = [r for poll in read_range(tls.cluster, f"dlq-{tag}", headers=True)
            for r in poll.records]
    assert [r.value for r in dead] == [b"{not json"]
    outputs += [repr(r.headers) for r in dead]

    pulled = metarec("model", "pull", *flags, "--out", str(tmp_path / "model.npz"), env=env)
    outputs += [pulled.stdout, pulled.stderr]
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert json.loads(pulled.stdout)["version"] >= 1

    replayed = metarec("replay", f"kafka:ev-{tag}", *flags, env=env)
    outputs += [replayed.stdout, replayed.stderr]
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert replayed.stdout.startswith(f"records {len(events()) + 1} in ")
    assert "dead letters 1 " in replayed.stdout

    outputs += serve_over_https(tls, flags, env, tmp_path, user=logged[0]["user_id"])
    assert_no_secret(*outputs)


def serve_over_https(tls: TlsBroker, flags: list[str], env: dict[str, str], tmp_path: Path,
                     user: str) -> list[str]:
    """``metarec serve`` following the TLS cluster, serving HTTPS with a token; what
    it printed and its /metrics."""
    port, log = free_port(), tmp_path / "serve.log"
    server_pem = tls.files.server
    client = httpx.Client(verify=ssl.create_default_context(cafile=tls.files.ca), timeout=10)
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", "serve", *flags, "--serve-port", str(port),
             "--serve-tls-certfile", str(server_pem), "--serve-tls-keyfile", str(server_pem)],
            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
            env=os.environ | env | {"METAREC_SERVE_TOKEN": TOKEN})
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if client.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        body = {"user_id": user, "items": [{"item_id": "i1"}, {"item_id": "i2"}]}
        assert client.post(url + "/v1/score", json=body).status_code == 401
        wrong = client.post(url + "/v1/score", json=body,
                            headers={"Authorization": "Bearer not-it"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = client.post(url + "/v1/score", json=body,
                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["known"] is True and len(ok.json()["scores"]) == 2
        with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        metrics = client.get(url + "/metrics").text
        assert 'metarec_serve_requests_total{code="401",endpoint="/v1/score"} 2.0' in metrics
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return [log.read_text(), metrics]


REFUSED_WITHIN_SECONDS = 20.0


def refused(tls: TlsBroker, *flags: str, bootstrap: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``metarec run`` with these connection flags: it must stop within the bound, in
    one line, before joining anything."""
    t0 = time.monotonic()
    done = metarec("run", "--bootstrap-servers", bootstrap or tls.bootstrap, "--metrics-port",
                   "0", "--events-topic", f"never-{uuid.uuid4().hex[:6]}", *flags,
                   env=tls.env(), timeout=120)
    assert time.monotonic() - t0 < REFUSED_WITHIN_SECONDS, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_no_secret(done.stderr)
    return done


@pytest.mark.integration
def test_a_broker_certificate_from_an_untrusted_ca_is_refused(tls: TlsBroker) -> None:
    done = refused(tls, "--security-protocol", "SSL", "--ssl-cafile", str(tls.files.other_ca),
                   "--ssl-certfile", str(tls.files.client_cert),
                   "--ssl-keyfile", str(tls.files.client_key))
    assert done.returncode == EXIT_REFUSED
    assert "the broker's TLS certificate is not trusted" in done.stderr
    assert "--ssl-cafile" in done.stderr


@pytest.mark.integration
def test_a_listener_that_wants_a_client_certificate_says_so(tls: TlsBroker) -> None:
    done = refused(tls, "--security-protocol", "SSL", "--ssl-cafile", str(tls.files.ca))
    assert done.returncode == EXIT_REFUSED
    assert "client certificate (--ssl-certfile)" in done.stderr


@pytest.mark.integration
def test_plaintext_to_a_tls_listener_and_tls_to_a_plaintext_one_are_named(
        tls: TlsBroker) -> None:
    plain = refused(tls)
    assert plain.returncode == EXIT_REFUSED
    assert "does it want TLS? (--security-protocol SSL or SASL_SSL)" in plain.stderr
    tls_to_plain = refused(tls, *tls.flags()[2:], bootstrap=tls.broker.bootstrap)
    assert tls_to_plain.returncode == EXIT_REFUSED
    assert "is it a PLAINTEXT listener?" in tls_to_plain.stderr


@pytest.mark.integration
def test_a_wrong_key_password_is_a_settings_error(tls: TlsBroker) -> None:
    done = metarec("model", "pull", *tls.flags(), env={"METAREC_SSL_KEY_PASSWORD": "not-it-42"})
    assert done.returncode == 2
    assert "cannot load the TLS files" in done.stderr and "not-it-42" not in done.stderr


def test_no_cluster_at_the_address_is_unreachable_not_refused() -> None:
    t0 = time.monotonic()
    done = metarec("model", "pull", "--bootstrap-servers", f"127.0.0.1:{free_port()}",
                   "--connect-timeout-seconds", "2")
    assert done.returncode == EXIT_KAFKA
    assert time.monotonic() - t0 < REFUSED_WITHIN_SECONDS
    assert "cannot reach the Kafka cluster" in done.stderr and "within 2 s" in done.stderr


@pytest.mark.integration
def test_a_refused_scram_login_fails_fast_and_never_shows_the_password() -> None:
    """A real SCRAM exchange with the broker's --authentication: it refuses every
    login (this Tansu build keeps no users in memory storage; tansu user create is
    refused once authentication is on), as a cluster refuses a wrong password."""
    with EmbeddedBroker(authentication=True) as broker:
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            t0 = time.monotonic()
            done = metarec("model", "pull", "--bootstrap-servers", broker.bootstrap,
                           "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism",
                           mechanism, "--sasl-username", "metarec",
                           "--connect-timeout-seconds", "5",
                           env={"METAREC_SASL_PASSWORD": PASSWORD, "METAREC_LOG_LEVEL": "DEBUG"})
            assert time.monotonic() - t0 < REFUSED_WITHIN_SECONDS
            assert done.returncode == EXIT_REFUSED, done.stderr
            assert (f"the SASL {mechanism} login of 'metarec' did not complete within 5 s: "
                    "a wrong user or password") in done.stderr
            assert "Traceback" not in done.stderr
            assert_no_secret(done.stdout, done.stderr)
        # and without SASL, the same broker is named as wanting a login, not unreachable
        plain = metarec("model", "pull", "--bootstrap-servers", broker.bootstrap,
                        "--connect-timeout-seconds", "5")
        assert plain.returncode == EXIT_KAFKA, plain.stderr  # (or a broker still starting)
        assert "does it want a SASL login" in plain.stderr


def test_a_certificate_for_another_name_is_refused_naming_the_host(tmp_path: Path) -> None:
    """A real TLS server whose certificate names only another host."""
    ca = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("kafka.example.com").configure_cert(context)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

        server = threading.Thread(target=accept, daemon=True)
        server.start()
        cluster = Cluster(f"127.0.0.1:{port}", SecuritySettings(
            security_protocol="SSL", ssl_cafile=tmp_path / "ca.pem"))
        with pytest.raises(ClusterAccessError, match=r"does not name '127\.0\.0\.1'"):
            check(cluster)
        server.join(5)


def test_the_metrics_endpoint_and_the_api_bind_loopback_unless_told() -> None:
    defaults = Settings()
    assert defaults.ops.metrics_host == "127.0.0.1"
    assert defaults.serve.host == "127.0.0.1"
    assert defaults.security.ssl_check_hostname is True
