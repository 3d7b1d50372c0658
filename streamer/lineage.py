"""Which model a process starts from, and how its versions are numbered.

A process continues the newest version on the model topic of its own layout
(its manifest's ``config_hash``: θ's width and table sizes), even if a version
of another layout came after it (a rolled-back configuration). With none, it
starts from a fresh initialisation, as a new lineage (parent none). Either way
its versions are numbered after the newest version of any lineage: loaders keep
the highest number, so an old lineage can never shadow the new one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from metarec import snapshot
from metarec.learner import LearnerConfig
from metarec.model import Theta, theta_shapes
from metarec.session import config_hash
from streamer.cluster import Cluster
from streamer.errors import SourceError
from streamer.model_topic import Lineage, read_versions

log = logging.getLogger("metarec.lineage")


@dataclass(frozen=True)
class Start:
    """θ to start from (None: fresh), the newest version on the topic, and the
    parent of the next version published."""

    theta: Theta | None = None
    last_version: int | None = None
    parent: int | None = None
    #: the loaded version's place among the group's θ updates (none loaded: the start)
    lineage: Lineage = field(default_factory=Lineage)
    #: the highest writer epoch on the topic
    epoch: int = 0
    #: what the loaded version had learned
    examples_learned: int = 0


def newest(cluster: Cluster, topic: str, config: LearnerConfig) -> Start:
    """The start of ``run``: the newest version of this layout (config hash), else
    the newest whose shapes fit (a version published before hashes named the
    layout), else a fresh lineage; numbered after the newest version of any."""
    found = read_versions(cluster, topic)
    if found.newest is None:
        log.info("no model version on %s: starting from a fresh initialisation", topic)
        return Start()
    last, ours = found.newest.manifest.version, config_hash(config)
    candidates = [found.by_hash[ours]] if ours in found.by_hash else sorted(
        found.by_hash.values(), key=lambda v: -v.manifest.version)
    for loaded in candidates:
        m = loaded.manifest
        try:
            theta = snapshot.loads(loaded.payload, shapes=theta_shapes(config.model))
        except snapshot.SnapshotError as exc:
            log.info("model version %d does not load into this configuration: %s", m.version,
                     exc)
            continue
        if m.config_hash != ours:
            log.warning("model version %d has config hash %s, not this layout's %s, but its "
                        "shapes fit: continuing it", m.version, m.config_hash, ours)
        log.info("loaded model version %d (%s, %d bytes) from %s; the next version is %d",
                 m.version, m.algorithm, m.size, topic, last + 1)
        return Start(theta, last, m.version, m.lineage, found.epoch, m.examples_learned)
    log.warning("no model version on %s is of this layout (config hash %s; the newest, %d, "
                "is %s): starting a fresh lineage, its first version %d", topic, ours, last,
                found.newest.manifest.config_hash, last + 1)
    return Start(last_version=last, epoch=found.epoch)


def exact(cluster: Cluster, topic: str, version: int, config: LearnerConfig) -> Start:
    """The start of ``replay --model-version``: that version, or a clear error."""
    found = read_versions(cluster, topic, want=version).newest
    if found is None:
        raise SourceError(f"model version {version} is not on {topic} (complete and intact)")
    try:
        theta = snapshot.loads(found.payload, shapes=theta_shapes(config.model))
    except snapshot.SnapshotError as exc:
        raise SourceError(f"model version {version} (config hash "
                          f"{found.manifest.config_hash}) does not fit this configuration "
                          f"(config hash {config_hash(config)}): set the dim and table sizes "
                          f"of the run that made it ({exc})") from exc
    return Start(theta, version, version)
