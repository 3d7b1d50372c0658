"""Which model a process starts from, and how its versions are numbered.

A process loads the newest version on the model topic if that version was made
with a configuration of the same layout (its manifest's ``config_hash``), and
continues its lineage. Otherwise it starts from a fresh initialisation, as a new
lineage (parent none) numbered after the newest version of any lineage: loaders
keep the highest number, so an old lineage can never shadow the new one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from metarec import snapshot
from metarec.learner import LearnerConfig
from metarec.model import Theta, init_theta
from metarec.session import config_hash
from streamer.errors import SourceError
from streamer.model_topic import read_versions

log = logging.getLogger("metarec.lineage")


@dataclass(frozen=True)
class Start:
    """θ to start from (None: fresh), the newest version on the topic, and the
    parent of the next version published."""

    theta: Theta | None = None
    last_version: int | None = None
    parent: int | None = None


def newest(bootstrap: str, topic: str, config: LearnerConfig) -> Start:
    """The start of ``run``: the newest version if it fits, else a fresh lineage."""
    found = read_versions(bootstrap, topic).newest
    if found is None:
        log.info("no model version on %s: starting from a fresh initialisation", topic)
        return Start()
    m, ours = found.manifest, config_hash(config)
    if m.config_hash != ours:
        log.warning("model version %d was made with config hash %s, this configuration's is "
                    "%s (another layout: dim or feature hashing): starting a fresh lineage, "
                    "its first version %d", m.version, m.config_hash, ours, m.version + 1)
        return Start(last_version=m.version)
    try:
        theta = snapshot.loads(found.payload, like=init_theta(config.model, config.seed))
    except snapshot.SnapshotError as exc:
        log.error("model version %d does not load (%s): starting a fresh lineage, its first "
                  "version %d", m.version, exc, m.version + 1)
        return Start(last_version=m.version)
    log.info("loaded model version %d (%s, %d bytes) from %s", m.version, m.algorithm, m.size,
             topic)
    return Start(theta, m.version, m.version)


def exact(bootstrap: str, topic: str, version: int, config: LearnerConfig) -> Start:
    """The start of ``replay --model-version``: that version, or a clear error."""
    found = read_versions(bootstrap, topic, want=version).newest
    if found is None:
        raise SourceError(f"model version {version} is not on {topic} (complete and intact)")
    m, ours = found.manifest, config_hash(config)
    if m.config_hash != ours:
        raise SourceError(f"model version {version} was made with config hash "
                          f"{m.config_hash}, this configuration's is {ours}: set the same dim "
                          "and feature hashing as the run that made it")
    try:
        theta = snapshot.loads(found.payload, like=init_theta(config.model, config.seed))
    except snapshot.SnapshotError as exc:
        raise SourceError(f"model version {version}: {exc}") from exc
    return Start(theta, m.version, m.version)
