"""Prometheus metrics for one service instance (its own registry, so tests can run several).

Counts come from one place: every event the publisher sends is shown to ``observe`` (outcome
codes, stage latencies, retries, fallbacks, refusals, events published). Levels (queue depth,
in flight, cool-downs, journal size, loop lag) are read when ``/metrics`` is scraped, from a
``LiveState`` the service provides, so nothing on the hot path updates them.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from schemas import ImageReady, RenderAccepted, RenderError

STAGES = ("queued", "normalize", "generate", "store", "total")
# Seconds: a mock renders in milliseconds, a remote provider in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class LiveState:
    """What the service reports at scrape time (filled in by ``ImageService.live_state``)."""

    queued: Mapping[str, int] = field(default_factory=dict)  # per generator
    in_flight: Mapping[str, int] = field(default_factory=dict)  # per generator
    cooling_down: Mapping[str, bool] = field(default_factory=dict)
    journal_bytes: int = 0
    journal_rows: int = 0
    journal_unfinished: int = 0
    loop_lag_s: float = 0.0
    counters: Mapping[str, int] = field(default_factory=dict)  # ImageService.counters
    spent_today: Mapping[str, float] = field(default_factory=dict)  # per generator, UTC day
    spent_month: Mapping[str, float] = field(default_factory=dict)  # per generator, UTC month
    over_budget: Mapping[str, bool] = field(default_factory=dict)
    cache: Mapping[str, int] = field(default_factory=dict)  # ResultReuse.stats()


class ServiceMetrics:
    """``enabled=False`` (no HTTP listener, so nobody can scrape) keeps only the outcome
    tally for the shutdown summary and skips the Prometheus updates."""

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "image_server_requests",
            "Accepted requests that ended, by generator and outcome",
            ["generator", "outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "image_server_stage_seconds",
            "Time per stage of a successful render",
            ["generator", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter("image_server_retries", "Provider attempts beyond the first", ["generator"], registry=r)
        self.fallbacks = Counter(
            "image_server_fallbacks", "Requests served by a fallback generator", ["requested", "used"], registry=r
        )
        self.events = Counter("image_server_events_published", "Events sent on the events socket", ["type"], registry=r)
        self.http_responses = Counter(
            "image_server_http_responses",
            "HTTP responses received from providers and reference hosts",
            ["host", "status"],
            registry=r,
        )
        self.spend = Counter(
            "image_server_spend",
            "What renders cost, in the price table's currency (a cache hit or a coalesced answer costs nothing)",
            ["generator"],
            registry=r,
        )
        self.reused = Counter(
            "image_server_reused_answers",
            "Requests answered with another render's images, by where from (cache or coalesced)",
            ["generator", "source"],
            registry=r,
        )
        self.outcomes: Tally[str] = Tally()  # "ok" or error code, for the shutdown summary
        self.refused: Tally[str] = Tally()  # reason -> count, exported with the live collector
        self._accepted_for: dict[str, str] = {}  # request_id -> generator it was accepted for
        # Labelled children, looked up once: ``labels()`` costs more than the increment.
        self._event_children: dict[str, Any] = {}
        self._stage_children: dict[str, list[Any]] = {}
        self.live = LiveState()
        r.register(_LiveCollector(self))

    def observe(self, event: BaseModel) -> None:
        """Count one published event (the publisher calls this for each)."""
        if self.enabled:
            kind = getattr(event, "type", type(event).__name__)
            child = self._event_children.get(kind)
            if child is None:
                child = self._event_children[kind] = self.events.labels(kind)
            child.inc()
        if isinstance(event, RenderAccepted):
            self._accepted_for[event.request_id] = event.generator
        elif isinstance(event, ImageReady):
            self._ready(event)
        elif isinstance(event, RenderError):
            requested = self._accepted_for.pop(event.request_id, None)
            if requested is None:
                self.refused[event.code] += 1  # refused before acceptance (or a repeat)
            else:
                self.outcomes[event.code] += 1
                if not self.enabled:
                    return
                self.requests.labels(event.generator or requested, event.code).inc()
                if event.attempts > 1:
                    self.retries.labels(event.generator or requested).inc(event.attempts - 1)

    def _ready(self, event: ImageReady) -> None:
        requested = self._accepted_for.pop(event.request_id, None)
        if requested is None:
            return  # a repeat of a finished request: counted when it first ended
        self.outcomes["ok"] += 1
        if not self.enabled:
            return
        self.requests.labels(event.generator, "ok").inc()
        if event.cost:
            self.spend.labels(event.generator).inc(event.cost)
        if event.cached_from is not None:
            self.reused.labels(event.generator, "cache" if event.cached else "coalesced").inc()
        timings = event.timings
        children = self._stage_children.get(event.generator)
        if children is None:
            children = [self.stage_seconds.labels(event.generator, stage) for stage in STAGES]
            self._stage_children[event.generator] = children
        for child, stage in zip(children, STAGES, strict=True):
            child.observe(getattr(timings, stage) / 1000.0)
        if event.attempts > 1:
            self.retries.labels(event.generator).inc(event.attempts - 1)
        if requested != event.generator:
            self.fallbacks.labels(requested, event.generator).inc()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Levels read at scrape time from ``ServiceMetrics.live``."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked: the label sets depend on the configured generators

    def collect(self) -> Iterator[Metric]:
        live = self.metrics.live
        per_generator = (
            ("image_server_queue_depth", "Accepted requests waiting for a slot", live.queued),
            ("image_server_in_flight", "Renders running now", live.in_flight),
            (
                "image_server_generator_cooling_down",
                "1 while a generator is skipped after repeated failures",
                {name: int(flag) for name, flag in live.cooling_down.items()},
            ),
            ("image_server_spent_today", "Spent today (UTC) per generator", live.spent_today),
            ("image_server_spent_month", "Spent this calendar month (UTC) per generator", live.spent_month),
            (
                "image_server_generator_over_budget",
                "1 while a generator's daily or monthly budget is spent",
                {name: int(flag) for name, flag in live.over_budget.items()},
            ),
        )
        for name, documentation, values in per_generator:
            gauge = GaugeMetricFamily(name, documentation, labels=["generator"])
            for generator, value in sorted(values.items()):
                gauge.add_metric([generator], float(value))
            yield gauge
        yield GaugeMetricFamily(
            "image_server_journal_bytes", "Journal file size (with its WAL)", value=live.journal_bytes
        )
        yield GaugeMetricFamily(
            "image_server_cache_entries", "Results in the result cache", value=live.cache.get("cache_entries", 0)
        )
        yield GaugeMetricFamily(
            "image_server_cache_bytes", "Bytes in the result cache", value=live.cache.get("cache_bytes", 0)
        )
        yield GaugeMetricFamily("image_server_journal_rows", "Requests in the journal", value=live.journal_rows)
        yield GaugeMetricFamily(
            "image_server_journal_unfinished",
            "Journaled requests with no terminal event",
            value=live.journal_unfinished,
        )
        yield GaugeMetricFamily(
            "image_server_event_loop_lag_seconds",
            "How late the event loop last answered a timer",
            value=live.loop_lag_s,
        )
        refused = CounterMetricFamily(
            "image_server_messages_refused", "Messages refused before acceptance, by reason", labels=["reason"]
        )
        reasons = Tally(self.metrics.refused)
        if live.counters.get("undecodable"):
            reasons["undecodable"] += live.counters["undecodable"]
        for reason, count in sorted(reasons.items()):
            refused.add_metric([reason], float(count))
        yield refused
        received = CounterMetricFamily("image_server_messages_received", "Messages read from the requests socket")
        received.add_metric([], float(live.counters.get("received", 0)))
        yield received
