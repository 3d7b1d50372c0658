"""``metarec serve``'s Prometheus metrics (served on the API's own port, /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: request latency buckets (seconds): the goal is milliseconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0)
#: how long a committed user value takes to be served (seconds)
DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("metarec_serve_requests_total", "HTTP requests by endpoint "
                                "and status code", ["endpoint", "code"], registry=r)
        self.latency = Histogram("metarec_serve_request_duration_seconds", "time to answer a "
                                 "request, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.candidates = Histogram("metarec_serve_candidates", "candidates per scoring "
                                    "request", buckets=(1, 10, 50, 100, 200, 500, 1000),
                                    registry=r)
        self.staleness = Gauge("metarec_serve_staleness_seconds", "time since the server last "
                               "held everything on the model, updates and changelog topics",
                               registry=r)
        self.lag = Gauge("metarec_serve_lag_records", "records of each topic not yet read "
                         "(-1: not known yet)", ["topic"], registry=r)
        self.model_version = Gauge("metarec_serve_model_version", "the newest model version "
                                   "whose updates the served θ holds (0: none)", registry=r)
        self.users = Gauge("metarec_serve_users", "users with personal state", registry=r)
        self.updates_applied = Counter("metarec_serve_updates_applied_total",
                                       "committed θ updates applied", registry=r)
        self.user_values_applied = Counter("metarec_serve_user_values_applied_total",
                                           "committed users' values applied", registry=r)
        self.skipped = Counter("metarec_serve_skipped_total", "records not applied, by "
                               "reason", ["reason"], registry=r)
        self.state_delay = Histogram("metarec_serve_state_delay_seconds", "from a member "
                                     "writing users' values to the server serving them",
                                     buckets=DELAY_BUCKETS, registry=r)
