"""Prometheus metrics and the ``stats`` figures, from one set of counters.

The hot path only touches plain Python ints and small lists: the broker is one thread
running one event loop, so nothing needs a lock, and a publish or a flush costs an integer
add, not a ``prometheus_client`` metric update (which takes a lock per call). Each
``BrokerServer`` owns a ``Metrics`` with its own ``CollectorRegistry``; at scrape time
``BrokerCollector`` turns the server's ``stats()`` figures and the histograms into metric
families, so ``GET /metrics`` and the ``stats`` op can never disagree.

Label values come from fixed sets only (``broker.errors.ERROR_CODES``, ``ATTEMPT_RESULTS``):
never a topic or a user id. Topics appear only in the admin-only ``stats`` op, through
``TopTopics``, whose memory is bounded whatever the number of distinct topics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.core.hooks import NAMES as HOOK_NAMES
from broker.errors import ERROR_CODES

__all__ = [
    "ATTEMPT_RESULTS",
    "CONTENT_TYPE_LATEST",
    "ERROR_CODES",
    "FastHistogram",
    "Metrics",
    "TopTopics",
    "wire_size",
]

#: Outcomes of a WebSocket connection attempt, the only values of the ``result`` label.
ATTEMPT_RESULTS = (
    "accepted",  # authenticated (header or first-frame token)
    "unauthorized",  # 401 on the handshake, or a refused first-frame token (close 4001)
    "forbidden_origin",  # 403: Origin not in --allowed-origin
    "over_capacity",  # 503: --max-connections reached
    "shutting_down",  # 503: the broker is draining
    "abandoned",  # the client closed before authenticating
)

#: Paths that are values of the ``path`` label of HTTP requests (any other is ``other``).
HTTP_PATHS = (
    "/api/publish",
    "/api/history",
    "/api/presence",
    "/api/stats",
    "/sse",
    "/healthz",
    "/metrics",
    "/",
)

#: Limits that refuse work when reached, the only values of the ``limit`` label.
LIMITS = (
    "connections",  # --max-connections (TCP sockets, counted from accept)
    "unauthenticated",  # --max-unauthenticated (the oldest waiting one is dropped)
    "unauthenticated_per_address",  # --max-unauthenticated-per-address (its oldest dropped)
    "subscriptions",  # --max-subscriptions (per connection)
    "anonymous",  # --max-anonymous (anonymous connections and streams, section 10)
    "anonymous_per_address",  # --max-anonymous-per-address
)

#: Latency buckets (seconds) for publish-to-ack, fan-out, store commits and Redis.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
#: Buckets for the number of publishes per store commit (the journal's max batch is 2000).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

# (stats key, metric name without "_total", help): counters taken from ``stats()``.
COUNTERS = (
    ("messages_in", "broker_messages_published", "Publishes accepted (rate limit and ACL passed)."),
    (
        "messages_out",
        "broker_messages_delivered",
        "Live messages handed to subscribers (one per subscriber).",
    ),
    ("bytes_in", "broker_received_bytes", "WebSocket message payload bytes received from clients."),
    (
        "bytes_out",
        "broker_sent_bytes",
        "Bytes written to client sockets by the broker, frame headers included.",
    ),
    (
        "slow_consumer_closes",
        "broker_slow_consumer_closes",
        "Connections closed with 4008 (slow consumer).",
    ),
    ("rate_limited", "broker_rate_limited_publishes", "Publishes refused with rate_limited."),
)
# (stats key, metric name, label, label values, help): labelled counters from ``stats()``.
LABELLED_COUNTERS = (
    (
        "errors",
        "broker_errors",
        "code",
        ERROR_CODES,
        "Error frames sent to clients, by wire error code.",
    ),
    (
        "connection_attempts",
        "broker_connection_attempts",
        "result",
        ATTEMPT_RESULTS,
        "WebSocket connection attempts, by outcome.",
    ),
    (
        "limit_hits",
        "broker_limit_hits",
        "limit",
        LIMITS,
        "Requests and connections refused because a limit was reached, by limit.",
    ),
)
# (stats key, metric name, help): gauges taken from ``stats()``.
GAUGES = (
    ("connections", "broker_connections", "Open authenticated connections."),
    ("subscriptions", "broker_subscriptions", "Subscriptions held by open connections."),
    ("topics", "broker_topics", "Distinct topics and patterns with at least one subscription."),
    (
        "pending_commits",
        "broker_pending_commits",
        "Publishes accepted but not yet written to the store.",
    ),
    ("last_seq", "broker_last_seq", "The highest seq fanned out on this node."),
    (
        "max_connections",
        "broker_max_connections",
        "Connections accepted at once: --max-connections, or what the descriptor limit allows.",
    ),
    (
        "unauthenticated",
        "broker_unauthenticated_connections",
        "Connections accepted and not authenticated yet.",
    ),
    (
        "anonymous",
        "broker_anonymous_connections",
        "Open anonymous connections and streams (public topics only).",
    ),
    ("streams", "broker_sse_streams", "Open server-sent event streams (GET /sse)."),
)


def wire_size(frame: str | bytes) -> int:
    """The UTF-8 size of a received WebSocket message, cheaply for ASCII text."""
    if type(frame) is bytes or frame.isascii():
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))  # type: ignore[union-attr]


class FastHistogram:
    """A Prometheus histogram for one event loop: ``observe`` is a bisect and two adds.

    Exposed through ``BrokerCollector``; the same ``observe`` call as
    ``prometheus_client.Histogram``, without its per-call lock.
    """

    __slots__ = ("bounds", "counts", "documentation", "name", "sum", "total")

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (seconds, or a size for non-latency histograms)."""
        # bisect_left, written out: compiled, a few float compares (most observations
        # fall in the first buckets) instead of a call into the bisect module.
        i = 0
        for bound in self.bounds:
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total += 1
        self.sum += value

    def family(self) -> HistogramMetricFamily:
        """The histogram as a metric family (cumulative buckets)."""
        family = HistogramMetricFamily(self.name, self.documentation)
        self.add_to(family, [])
        return family

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        """Add this histogram to ``family`` with label values ``labels``."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            buckets.append((_float_label(bound), running))
        buckets.append(("+Inf", self.total))
        family.add_metric(labels, buckets, self.sum)


def _float_label(value: float) -> str:
    return repr(float(value))


class TopTopics:
    """Publishes per topic for the busiest topics, in bounded memory.

    Counts every topic until ``limit`` distinct topics are held, then keeps only the
    ``keep`` busiest: a topic dropped that way starts again from zero, so the figures are
    exact for topics that stay busy and approximate only around the cut.
    """

    __slots__ = ("counts", "keep", "limit")

    def __init__(self, keep: int = 100, limit: int = 1000) -> None:
        if not 0 < keep < limit:
            raise ValueError("need 0 < keep < limit")
        self.keep = keep
        self.limit = limit
        self.counts: dict[str, int] = {}

    def add(self, topic: str) -> None:
        """Count one publish to ``topic``."""
        counts = self.counts
        counts[topic] = counts.get(topic, 0) + 1
        if len(counts) > self.limit:
            self.prune()

    def prune(self) -> None:
        """Keep only the ``keep`` busiest topics."""
        self.counts = dict(self.top(self.keep))

    def top(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` busiest topics, busiest first (ties by name)."""
        return sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:n]

    def __len__(self) -> int:
        return len(self.counts)


class Metrics:
    """A broker node's counters, histograms and Prometheus registry.

    Plain int counters (``bytes_in``, ``rate_limited``, ``slow_consumer_closes``,
    ``errors[code]``, ``attempts[result]``) are increased by the server; the figures that
    already live elsewhere (messages in and out, bytes out, connections) are read through
    ``figures``, the server's ``stats()``, at scrape time.
    """

    def __init__(self, figures: Callable[[], Mapping[str, Any]], *, process: bool = True) -> None:
        self.figures = figures
        self.started = time.time()
        self.bytes_in = 0
        self.slow_consumer_closes = 0
        self.rate_limited = 0
        self.errors: dict[str, int] = dict.fromkeys(ERROR_CODES, 0)
        self.attempts: dict[str, int] = dict.fromkeys(ATTEMPT_RESULTS, 0)
        self.limit_hits: dict[str, int] = dict.fromkeys(LIMITS, 0)
        #: (path, status) -> plain HTTP requests answered.
        self.http_requests: dict[tuple[str, int], int] = {}
        self.top_topics = TopTopics()
        self.publish_seconds = FastHistogram(
            "broker_publish_ack_seconds",
            "Time from receiving a pub to its message being recorded and its ok queued.",
            LATENCY_BUCKETS,
        )
        self.fanout_seconds = FastHistogram(
            "broker_fanout_seconds",
            "Time to hand one committed batch of messages to every matching connection.",
            LATENCY_BUCKETS,
        )
        self.commit_seconds = FastHistogram(
            "broker_store_commit_seconds",
            "Time of one store append (one group commit).",
            LATENCY_BUCKETS,
        )
        self.commit_batch = FastHistogram(
            "broker_store_commit_batch_size", "Publishes written per store append.", BATCH_BUCKETS
        )
        #: Observed by the cluster backend: one Redis command or pipeline, request to reply.
        self.redis_roundtrip_seconds = FastHistogram(
            "broker_redis_roundtrip_seconds",
            "Round trip of one Redis command or pipeline (cluster mode only).",
            LATENCY_BUCKETS,
        )
        #: Hooks to the application's backend (broker.server.hooks), per hook name.
        self.hook_calls: dict[str, int] = dict.fromkeys(HOOK_NAMES, 0)
        self.hook_failures: dict[str, int] = dict.fromkeys(HOOK_NAMES, 0)
        self.hook_seconds = {
            name: FastHistogram("broker_hook_seconds", "", LATENCY_BUCKETS) for name in HOOK_NAMES
        }
        #: Hook events dropped because their queue was full; events waiting to be sent.
        self.hook_events_dropped = 0
        self.hook_events_queued: Callable[[], int] = lambda: 0
        self.histograms = (
            self.publish_seconds,
            self.fanout_seconds,
            self.commit_seconds,
            self.commit_batch,
            self.redis_roundtrip_seconds,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(self))
        if process:
            ProcessCollector(registry=self.registry)

    # -- recording (hot path: ints only) -----------------------------------------------

    def error(self, code: str) -> None:
        """Count one error frame sent with wire code ``code``."""
        key = code if code in self.errors else "internal"
        self.errors[key] += 1

    def attempt(self, result: str) -> None:
        """Count one connection attempt with outcome ``result`` (one of ATTEMPT_RESULTS)."""
        self.attempts[result] += 1

    def limit_hit(self, limit: str) -> None:
        """Count one refusal by ``limit`` (one of ``LIMITS``)."""
        self.limit_hits[limit] += 1

    def http_request(self, path: str, status: int) -> None:
        """Count one plain HTTP request answered with ``status`` (paths outside
        ``HTTP_PATHS`` count as ``other``)."""
        key = (path if path in HTTP_PATHS else "other", status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def observe_commit(self, size: int, seconds: float) -> None:
        """A ``Journal.commit_observers`` hook: one store append of ``size`` publishes."""
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(size)

    # -- reading -----------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (serve as ``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class BrokerCollector(Collector):
    """Builds the ``broker_*`` metric families from one ``stats()`` call per scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        figures = metrics.figures()
        for key, name, doc in GAUGES:
            yield GaugeMetricFamily(name, doc, value=figures.get(key, 0))
        for key, name, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=figures.get(key, 0))
        for key, name, label, values, doc in LABELLED_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=[label])
            counts = figures.get(key, {})
            for value in values:
                family.add_metric([value], counts.get(value, 0))
            yield family
        family = CounterMetricFamily(
            "broker_http_requests",
            "Plain HTTP requests answered (the HTTP API, health, metrics, console), by path "
            "and status.",
            labels=["path", "status"],
        )
        for (path, status), count in sorted(metrics.http_requests.items()):
            family.add_metric([path, str(status)], count)
        yield family
        for histogram in metrics.histograms:
            yield histogram.family()
        yield from _hook_families(metrics)
        yield GaugeMetricFamily(
            "broker_start_time_seconds",
            "When this broker started (Unix time).",
            value=metrics.started,
        )


def _hook_families(metrics: Metrics) -> Iterator[Metric]:
    """The hooks' calls, failures and latency per hook, and the events queue."""
    calls = CounterMetricFamily(
        "broker_hook_calls", "Calls to the application's backend, by hook.", labels=["hook"]
    )
    failures = CounterMetricFamily(
        "broker_hook_failures",
        "Hook calls that failed (timeout, connection error, unexpected status), by hook.",
        labels=["hook"],
    )
    seconds = HistogramMetricFamily(
        "broker_hook_seconds", "Time of one hook call, request to answer, by hook.", labels=["hook"]
    )
    for name in HOOK_NAMES:
        calls.add_metric([name], metrics.hook_calls[name])
        failures.add_metric([name], metrics.hook_failures[name])
        metrics.hook_seconds[name].add_to(seconds, [name])
    yield calls
    yield failures
    yield seconds
    yield CounterMetricFamily(
        "broker_hook_events_dropped",
        "Hook events dropped because the events queue was full.",
        value=metrics.hook_events_dropped,
    )
    yield GaugeMetricFamily(
        "broker_hook_events_queued",
        "Hook events waiting to be sent to the backend.",
        value=metrics.hook_events_queued(),
    )
