"""deploy/: alert rules pass promtool's tests, the dashboard asks only for
metrics metarec exports, a real Prometheus scrapes a running `metarec run`
and `metarec serve`, and the manifests set only settings that exist, with the
credentials from files of a Secret."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from metarec.datasets.synthetic import SyntheticStream
from streamer import kafka_io
from streamer.config import LEAVES
from streamer.embedded import EmbeddedBroker, free_port
from streamer.metrics import Metrics
from streamer.serving_metrics import ServingMetrics
from tests.test_kafka_integration import Topics, metarec, produce, read_all

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (./dev test installs Debian's prometheus package)"
    return path


def test_alert_rules_pass_promtool_unit_tests() -> None:
    done = subprocess.run([tool("promtool"), "test", "rules", "alerts_test.yml"],
                          cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = subprocess.run([tool("promtool"), "check", "config", "prometheus.yml"],
                            cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                            timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


def exported_names() -> set[str]:
    names = set()
    families = [*Metrics().registry.collect(), *ServingMetrics().registry.collect()]
    for family in families:
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "counter":  # labelled ones have no sample until first use
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update({family.name + s for s in ("_bucket", "_sum", "_count")})
    return names


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "metarec.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += re.findall(r"expr: (.*)", (DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {m for e in exprs for m in re.findall(r"\b(metarec_[a-z_]+)", e)}
    assert used, "no metric referenced"
    missing = used - exported_names()
    assert not missing, missing


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success"
    return list(body["data"]["result"])


def wait_for(port: int, promql: str, seconds: float = 90) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = query(port, promql)
        except OSError:
            found = []
        if found:
            return found
        time.sleep(1)
    return []


@pytest.mark.integration
def test_a_real_prometheus_scrapes_metarec_run_and_serve(broker: EmbeddedBroker,
                                                         tmp_path: Path) -> None:
    topics = Topics()
    kafka_io.ensure_topics(broker.cluster, topics.settings(broker).kafka)
    # a click-rate jump half-way: the alarm must reach Prometheus and the drift topic
    produce(broker, topics.events,
            list(SyntheticStream(users=600, events_per_user=30, seed=21,
                                 drift="click_rate").events()),
            [(b"garbage", "not_json")])
    metrics_port, prom_port, serve_port = free_port(), free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: metarec\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        f"  - job_name: metarec-serve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n")
    serve = subprocess.Popen(metarec("serve", *topics.flags(broker), "--metrics-port", "0",
                                     "--serve-port", str(serve_port)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen(metarec("run", *topics.flags(broker), "--metrics-port",
                                   str(metrics_port), "--drift-segment-field", "region"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prom = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found = wait_for(prom_port, 'metarec_events_total{type="impression"} > 0')
        assert found, "Prometheus never saw metarec_events_total"
        assert found[0]["metric"]["job"] == "metarec"
        assert float(found[0]["value"][1]) > 0
        assert query(prom_port, 'up{job="metarec"} == 1')
        # the malformed record sits mid-stream: its count arrives with a later scrape
        assert wait_for(prom_port, 'metarec_dead_letters_total{reason="not_json"} == 1')
        assert wait_for(prom_port, 'metarec_drift_alarms_total{signal="click_rate"} > 0')
        # the episode's gauge is exported (a backlog this small opens and settles the
        # episode within a scrape interval: the counter, which the alert also reads,
        # is what keeps it)
        assert wait_for(prom_port, 'metarec_drift_episode_open{signal="click_rate",'
                                   'segment="all"} >= 0')
        # the server follows what the run learns, and counts what it answers
        assert wait_for(prom_port, 'metarec_serve_users{job="metarec-serve"} > 0')
        body = json.dumps({"user_id": "u1", "items": [{"item_id": "i1"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{serve_port}/v1/score", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        assert wait_for(prom_port, 'metarec_serve_requests_total{endpoint="/v1/score",'
                                   'code="200"} == 1')
        assert query(prom_port, 'up{job="metarec-serve"} == 1')
    finally:
        serve.send_signal(signal.SIGTERM)
        prom.terminate()
        run.send_signal(signal.SIGTERM)
        prom.wait(30)
        _, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr[-2000:]
    assert "drift episode opened: click_rate" in stderr
    _, serve_log = serve.communicate(timeout=30)
    assert serve.returncode == 0, serve_log[-2000:]
    drift = [json.loads(m.value) for m in read_all(broker, topics.drift, 1)]
    assert any(d["signal"] == "click_rate" and d["segment"] == "all" for d in drift)
    assert all({"state", "timestamp", "before", "after", "magnitude", "relative"} <= set(d)
               for d in drift)



#: read by the CLI itself, not a setting
NOT_SETTINGS = {"METAREC_LOG_LEVEL"}


def deploy_variables() -> dict[str, str]:
    """Every METAREC_ variable the deploy files set, with its value, from the compose
    file, its env files and the Kubernetes manifests."""
    found: dict[str, str] = {}
    for path in DEPLOY.glob("*.env*"):
        for line in path.read_text().splitlines():
            line = line.lstrip("# ").strip()
            if re.fullmatch(r"METAREC_\w+=\S*", line):
                name, _, value = line.partition("=")
                found[name] = value
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        found |= {k: str(v) for k, v in service.get("environment", {}).items()}
    for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "metarec.yaml").read_text()):
        if doc["kind"] == "ConfigMap":
            found |= doc["data"]
        for container in _containers(doc):
            found |= {e["name"]: e.get("value", "") for e in container.get("env", [])}
    return {k: v for k, v in found.items() if k.startswith("METAREC_")}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def test_the_deploy_files_set_only_settings_that_exist() -> None:
    known = {leaf.env for leaf in LEAVES.values()} | NOT_SETTINGS
    variables = deploy_variables()
    assert {"METAREC_SECURITY_PROTOCOL", "METAREC_SASL_PASSWORD_FILE",
            "METAREC_SERVE_TOKEN_FILE"} <= set(variables)
    assert set(variables) <= known, set(variables) - known


def test_kubernetes_reads_every_credential_from_a_mounted_secret() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "metarec.yaml").read_text()))
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap")
    for doc in docs:
        for container in _containers(doc):
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
            secret_dirs = [m["mountPath"] for name, m in mounts.items()
                           if "secret" in volumes[name] and m.get("readOnly")]
            env = config | {e["name"]: e.get("value", "") for e in container.get("env", [])}
            files = [v for k, v in env.items() if k.endswith(("_FILE", "_CAFILE"))]
            assert files and all(any(f.startswith(d + "/") for d in secret_dirs) for f in files)
            # no secret's value in the manifest itself
            assert not {"METAREC_SASL_PASSWORD", "METAREC_SSL_KEY_PASSWORD",
                        "METAREC_SERVE_TOKEN"} & set(env)
