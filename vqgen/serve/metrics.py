"""What ``GET /metrics`` says, in the Prometheus text format (version 0.0.4).

Counters only grow, so a scraper computes rates itself (``rate(vqgen_images_total[1m])``); for
a person reading the page the server also shows images/s and image tokens/s over the last
``window`` seconds. Latency is one image's time from its request's arrival to its PNG.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable

# seconds; an image of the CPU demo takes ~0.1-1 s, a B-size model's on a GPU a few seconds
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Thread-safe counters, a latency histogram and a sliding window of finished images.
    ``gauges`` are read when the page is rendered (queue depth, rows in use, ...)."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]], window: float = 60.0):
        self.gauges, self.window = gauges, window
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()  # by HTTP status
        self.images = self.tokens = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last is +Inf
        self.latency_sum = 0.0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (finished at, tokens)
        self.started = time.monotonic()

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[str(status)] += 1

    def image(self, tokens: int, latency: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.images += 1
            self.tokens += tokens
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
            self.latency_sum += latency
            self.recent.append((now, tokens))

    def rates(self) -> tuple[float, float]:
        """(images/s, image tokens/s) over the last ``window`` seconds (or since start)."""
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.window:
                self.recent.popleft()
            span = min(self.window, max(now - self.started, 1e-9))
            return len(self.recent) / span, sum(t for _, t in self.recent) / span

    def render(self) -> str:
        images_s, tokens_s = self.rates()
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        for name, (help_text, read) in self.gauges.items():
            metric(name, "gauge", help_text, [("", float(read()))])
        metric("vqgen_images_per_second", "gauge", f"images finished per second over the last {self.window:g} s",
               [("", images_s)])
        metric("vqgen_image_tokens_per_second", "gauge",
               f"image tokens sampled per second over the last {self.window:g} s", [("", tokens_s)])
        with self.lock:
            metric("vqgen_requests_total", "counter", "HTTP image requests answered, by status",
                   [(f'{{status="{status}"}}', n) for status, n in sorted(self.requests.items())])
            metric("vqgen_images_total", "counter", "images finished", [("", self.images)])
            metric("vqgen_image_tokens_total", "counter", "image tokens sampled for finished images", [("", self.tokens)])
            cumulative, samples = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets):
                cumulative += count
                samples.append((f'_bucket{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}}', cumulative))
            samples += [("_sum", self.latency_sum), ("_count", cumulative)]
            metric("vqgen_image_latency_seconds", "histogram", "an image's time from request to PNG", samples)
        return "\n".join(lines) + "\n"
