"""Prometheus metrics of one `heedful serve` process (`--metrics-port`, off by default).

Serving metrics are counted as requests and events happen: completion latency histograms, completions
served or empty, feedback events (accepts, partial accepts, rejects, corrections...) and the characters of
accepted suggestions still in place at their last edit snapshot, each by team and experiment arm
(`experiment.arms`; a developer without a team counts under team "none"). Learning
metrics are read from the store when Prometheus scrapes: the active adapter version and step per scope,
and the training loss and KL of each scope's latest trained adapter.

The endpoint listens on 127.0.0.1 unless told otherwise; it serves numbers and scope names, never text
from the store.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from storage.store import RolloutStore

log = logging.getLogger(__name__)

NO_TEAM = "none"
STORE_TIMEOUT_S = 5.0
# Completion latency on CPU runs from tens of milliseconds to seconds; on a GPU, well under 250 ms.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServingMetrics:
    """The metrics one server process counts, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "heedful_completion_latency_seconds",
            "Time from a completion request to its answer, by team, arm and LSP method.",
            ["team", "arm", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.completions = Counter(
            "heedful_completions",
            "Completion requests answered, by team, arm and outcome (served: a suggestion; empty: none).",
            ["team", "arm", "outcome"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "heedful_feedback_events",
            "Feedback events recorded (accepted, partial_accept, rejected, correction, shown, edit_snapshot), "
            "by team and arm.",
            ["team", "arm", "kind"],
            registry=self.registry,
        )
        self.kept = Counter(
            "heedful_kept_characters",
            "Characters of accepted suggestions still in place at their last edit snapshot, by team and arm; "
            'divided by heedful_feedback_events_total{kind="shown"} it is kept characters per shown suggestion.',
            ["team", "arm"],
            registry=self.registry,
        )
        self.silent = Counter(
            "heedful_silent_completions",
            "Completions the developer's show policy held back (completion.show_threshold): the engine wrote one, "
            "and the server answered nothing, by team and arm. They also count as empty in heedful_completions.",
            ["team", "arm"],
            registry=self.registry,
        )
        self.groups = Counter(
            "heedful_training_groups",
            "Training groups of served completions, by team and outcome (sampled; skipped: "
            "completion.group_max_pending groups were still sampling).",
            ["team", "outcome"],
            registry=self.registry,
        )
        self._http: Any = None

    def count_group(self, team: str | None, sampled: bool) -> None:
        self.groups.labels(team=team or NO_TEAM, outcome="sampled" if sampled else "skipped").inc()

    def observe_completion(self, team: str | None, arm: str, method: str, seconds: float, served: bool) -> None:
        labels = {"team": team or NO_TEAM, "arm": arm}
        self.latency.labels(method=method, **labels).observe(seconds)
        self.completions.labels(outcome="served" if served else "empty", **labels).inc()

    def count_event(self, team: str | None, arm: str, kind: str) -> None:
        self.feedback.labels(team=team or NO_TEAM, arm=arm, kind=kind).inc()

    def count_silent(self, team: str | None, arm: str) -> None:
        self.silent.labels(team=team or NO_TEAM, arm=arm).inc()

    def count_kept(self, team: str | None, arm: str, characters: int) -> None:
        self.kept.labels(team=team or NO_TEAM, arm=arm).inc(characters)

    def expose(self, store: RolloutStore, loop: asyncio.AbstractEventLoop, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port), with the store's learning metrics; the bound port."""
        self.registry.register(StoreCollector(store, loop))
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = int(server.server_address[1])
        # The one line a supervisor (or a test) reads to learn the port when 0 was given.
        print(f"heedful: metrics on http://{host}:{bound}/metrics", file=sys.stderr, flush=True)
        return bound

    def close(self) -> None:
        if self._http is not None:
            threading.Thread(target=self._http.shutdown, daemon=True).start()
            self._http.server_close()
            self._http = None


class StoreCollector(Collector):
    """Reads the adapter versions from the store at scrape time (on the server's event loop)."""

    def __init__(self, store: RolloutStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop

    def describe(self) -> list[Metric]:
        return []  # collected only when scraped: the store is not read at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("heedful_store_up", "1 when the store answered this scrape, 0 when it did not.")
        try:
            future = asyncio.run_coroutine_threadsafe(self._store.adapter_overview(), self._loop)
            scopes = future.result(timeout=STORE_TIMEOUT_S)
        except Exception as exc:  # a scrape must not fail because the store is slow or down
            log.warning("metrics: the store did not answer (%s)", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        active = GaugeMetricFamily(
            "heedful_adapter_active", "1 for the adapter version serving each scope.", labels=["scope", "version"]
        )
        step = GaugeMetricFamily(
            "heedful_adapter_step", "Training steps of each scope's active adapter.", labels=["scope"]
        )
        loss = GaugeMetricFamily(
            "heedful_training_loss", "Final loss of each scope's latest training round.", labels=["scope"]
        )
        kl = GaugeMetricFamily(
            "heedful_training_kl", "KL to the reference of each scope's latest trained adapter.", labels=["scope"]
        )
        for scope, info in sorted(scopes.items()):
            if info["active_version"] is not None:
                active.add_metric([scope, info["active_version"]], 1.0)
                step.add_metric([scope], float(info["active_step"]))
            if info["latest_loss"] is not None:
                loss.add_metric([scope], float(info["latest_loss"]))
            if info["latest_kl"] is not None:
                kl.add_metric([scope], float(info["latest_kl"]))
        yield from (active, step, loss, kl)
