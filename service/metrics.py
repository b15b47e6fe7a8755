"""Prometheus metrics with Triton's names, so existing dashboards and autoscaling rules work unchanged.

Counters are not incremented on the hot path: a collector reads the per-version ModelStats (the same numbers
the statistics extension serves) at scrape time. Histograms (end-to-end latency, queue wait, batch size) are
ours. Every metric lives on a registry owned by one server, so tests get fresh ones.

The text exposition is written here (`exposition`), not by prometheus_client's `generate_latest`: that one
always renames a counter family to `<name>_total` and adds `<name>_created` series, and Triton's counters
(`# TYPE nv_inference_request_success counter`, samples without `_total`) have neither.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.errors import ServingError
from service.hosts import HostRule, host_error
from service.stats import FILL_BUCKETS, ModelStats

log = logging.getLogger("modelserve.metrics")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# (metric name, help, how to read it from ModelStats)
_COUNTERS: list[tuple[str, str, Callable[[ModelStats], int]]] = [
    ("nv_inference_request_success", "Number of successful inference requests", lambda s: s.success.count),
    ("nv_inference_count", "Number of inferences performed (batch rows)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (batches)", lambda s: s.execution_count),
    # NOTE: successes only, as Triton (InferenceStatsAggregator::UpdateSuccess); failures are counted, not timed.
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative compute output duration in microseconds",
     lambda s: s.compute_output.ns // 1000),
]
_FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


class TritonStatsCollector(Collector):
    """Exposes ModelStats as counters under Triton's exact sample names (written by `exposition`)."""

    def __init__(self, versions: Callable[[], Iterable[ModelStats]]) -> None:
        self._versions = versions

    def collect(self) -> Iterable[Metric]:
        stats = list(self._versions())
        for name, doc, read in _COUNTERS:
            metric = Metric(name, doc, "counter")
            for s in stats:
                metric.add_sample(name, {"model": s.name, "version": s.version}, read(s))
            yield metric
        failure = Metric("nv_inference_request_failure", "Number of failed inference requests", "counter")
        for s in stats:
            for reason in _FAILURE_REASONS:
                labels = {"model": s.name, "version": s.version, "reason": reason}
                failure.add_sample("nv_inference_request_failure", labels, s.failures.get(reason, 0))
        yield failure
        pending = Metric("nv_inference_pending_request_count", "Requests waiting in the queue", "gauge")
        for s in stats:
            pending.add_sample("nv_inference_pending_request_count", {"model": s.name, "version": s.version}, s.pending)
        yield pending
        yield from _dispatch_metrics(stats)


def _dispatch_metrics(stats: list[ModelStats]) -> Iterable[Metric]:
    """How full each dispatched batch was, by why it left the queue (full, preferred, delay, adaptive,
    unbatched); the histogram's `_count` is the number of batches dispatched for that reason. One histogram
    rather than an extra counter: a counter would need a `_total` name, which Triton's style here avoids."""
    fill = Metric("modelserve_batch_fill_ratio",
                  "Rows of each dispatched batch over max_batch_size, by dispatch reason", "histogram")
    for s in stats:
        for reason, d in sorted(s.dispatches.items()):
            labels = {"model": s.name, "version": s.version, "reason": reason}
            cumulative = 0
            for le, n in zip(FILL_BUCKETS, d.fill_buckets):
                cumulative += n
                fill.add_sample("modelserve_batch_fill_ratio_bucket", {**labels, "le": floatToGoString(le)}, cumulative)
            fill.add_sample("modelserve_batch_fill_ratio_bucket", {**labels, "le": "+Inf"}, d.count)
            fill.add_sample("modelserve_batch_fill_ratio_count", labels, d.count)
            fill.add_sample("modelserve_batch_fill_ratio_sum", labels, d.fill_sum)
    yield fill


class GpuCollector(Collector):
    """Triton's nv_gpu_* metrics through NVML, labelled by gpu_uuid; absent without a GPU.

    Power and energy are not supported on every board: NVML raises for them there, and that GPU's sample
    is left out rather than written as 0. Energy is counted from the collector's start, as Triton counts
    it from the server's.
    """

    def __init__(self) -> None:
        # NOTE: optional dependency (nvidia-ml-py, the `gpu` extra); without it there are no GPU metrics
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._devices = [(handle, self._uuid(handle)) for handle in handles]
        self._energy_start = {uuid: self._read(pynvml.nvmlDeviceGetTotalEnergyConsumption, handle)
                              for handle, uuid in self._devices}

    def _uuid(self, handle) -> str:
        uuid = self._nvml.nvmlDeviceGetUUID(handle)
        return uuid if isinstance(uuid, str) else uuid.decode()

    def _read(self, call: Callable, handle) -> float | None:
        try:
            return float(call(handle))
        except self._nvml.NVMLError:  # not supported on this board (power, energy on some GPUs)
            return None

    def collect(self) -> Iterable[Metric]:
        nv = self._nvml
        families = {name: Metric(name, doc, kind) for name, doc, kind in _GPU_FAMILIES}
        for handle, uuid in self._devices:
            labels = {"gpu_uuid": uuid}
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            energy, start = self._read(nv.nvmlDeviceGetTotalEnergyConsumption, handle), self._energy_start[uuid]
            power = self._read(nv.nvmlDeviceGetPowerUsage, handle)
            limit = self._read(nv.nvmlDeviceGetPowerManagementLimit, handle)
            values = {
                "nv_gpu_utilization": nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                "nv_gpu_memory_used_bytes": mem.used, "nv_gpu_memory_total_bytes": mem.total,
                "nv_gpu_power_usage": None if power is None else power / 1000.0,  # NVML: milliwatts
                "nv_gpu_power_limit": None if limit is None else limit / 1000.0,
                "nv_energy_consumption": None if energy is None or start is None else (energy - start) / 1000.0,  # mJ
            }
            for name, value in values.items():
                if value is not None:
                    families[name].add_sample(name, labels, value)
        yield from families.values()


# Triton's names, help texts and types (nv_energy_consumption is its one GPU counter).
_GPU_FAMILIES = (
    ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "gauge"),
    ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge"),
    ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge"),
    ("nv_gpu_power_usage", "GPU power usage in watts", "gauge"),
    ("nv_gpu_power_limit", "GPU power management limit in watts", "gauge"),
    ("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started", "counter"),
)


class RequestHistograms(Collector):
    """Per-request histograms (latency, queue wait, batch size) by model and version, read at scrape time.

    NOTE: hand-written instead of prometheus_client's Histogram because its observe() takes a lock per bucket
    update and walks the buckets in Python: three observations cost ~9 us of the event loop per request
    (py-spy, zoo `cnn`, concurrency 32). Here an observation is a bisect and two additions on the loop thread
    (the only writer); a scrape copies the counts, so a sample is never torn across buckets.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self.series: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def child(self, model: str, version: str) -> tuple[list[int], list[float]]:
        """(counts per bucket, not cumulative, with +Inf last; [sum]) of one model version."""
        found = self.series.get((model, version))
        if found is None:
            found = self.series[(model, version)] = ([0] * (len(self.bounds) + 1), [0.0])
        return found

    def observe(self, child: tuple[list[int], list[float]], value: float) -> None:
        counts, total = child
        counts[bisect.bisect_left(self.bounds, value)] += 1
        total[0] += value

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model", "version"])
        for (model, version), (counts, total) in list(self.series.items()):
            cumulative, buckets = 0, []
            for le, n in zip(self._le, list(counts)):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric([model, version], buckets, total[0])
        yield family


class Metrics:
    """One server's registry: the Triton collector, our histograms, and GPU metrics when NVML works."""

    def __init__(self, versions: Callable[[], Iterable[ModelStats]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(TritonStatsCollector(versions))
        self.latency = RequestHistograms("modelserve_request_latency_seconds",
                                         "End-to-end inference latency inside the server", _LATENCY_BUCKETS)
        self.queue_wait = RequestHistograms("modelserve_queue_wait_seconds",
                                            "Time a request waited in the batcher's queue", _LATENCY_BUCKETS)
        self.batch_size = RequestHistograms("modelserve_batch_size",
                                            "Rows in the batch each request was executed in", _BATCH_BUCKETS)
        for histogram in (self.latency, self.queue_wait, self.batch_size):
            self.registry.register(histogram)
        try:
            self.registry.register(GpuCollector())
            log.info("GPU metrics enabled through NVML")
        except Exception as exc:  # no nvidia-ml-py, no driver or no GPU: CPU-only serving
            log.debug("GPU metrics disabled: %s", exc)

        self._children: dict[tuple[str, str], tuple] = {}

    def observe_request(self, model: str, version: str, *, total_s: float, queue_s: float, batch_rows: int) -> None:
        children = self._children.get((model, version))
        if children is None:  # resolve each histogram's series once per version
            children = tuple(h.child(model, version) for h in (self.latency, self.queue_wait, self.batch_size))
            self._children[(model, version)] = children
        self.latency.observe(children[0], total_s)
        self.queue_wait.observe(children[1], queue_s)
        self.batch_size.observe(children[2], batch_rows)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(text: str, *, quotes: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quotes else text


def _sample_line(name: str, labels: dict[str, str], value: float) -> str:
    if labels:
        pairs = ",".join(f'{k}="{_escape(str(v), quotes=True)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{pairs}}} {floatToGoString(value)}\n"
    return f"{name} {floatToGoString(value)}\n"


def exposition(registry: CollectorRegistry) -> bytes:
    """Prometheus text format 0.0.4 with family names as given: Triton's counters keep their names, and no
    `_created` series is written (Triton has none)."""
    out: list[str] = []
    for family in registry.collect():
        kind = "untyped" if family.type == "unknown" else family.type
        out.append(f"# HELP {family.name} {_escape(family.documentation, quotes=False)}\n")
        out.append(f"# TYPE {family.name} {kind}\n")
        created = family.name + "_created"
        out.extend(_sample_line(s.name, s.labels, s.value) for s in family.samples if s.name != created)
    return "".join(out).encode()


class MetricsPortServer:
    """`--metrics-port`: /metrics on its own port (as Triton's 8002), served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int, hosts: HostRule | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def parse_request(self) -> bool:
                """The request line and headers, then the main HTTP port's Host checks (service/hosts.py): a
                loopback metrics port answered any Host, so a rebound page could read every model's counts."""
                if not super().parse_request():
                    return False
                values = [v.strip().encode("latin-1") for v in self.headers.get_all("Host") or []]
                error: ServingError | None = host_error(values, http11=self.request_version == "HTTP/1.1")
                if error is None and hosts is not None:
                    error = hosts.denial([(b"host", v) for v in values])
                if error is None:
                    return True
                self._refuse(error)
                return False

            def _refuse(self, error: ServingError) -> None:
                self.close_connection = True
                self._answer(error.status_code, orjson.dumps({"error": error.message}),
                             extra={"Connection": "close"}, json=True)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                # NOTE: BaseHTTPRequestHandler answers a request it cannot parse (an HTTP/2 preface: 505, a
                # line or header over its bounds: 414/431) with an HTML page; the same error as the main port's.
                if self.request_version == "HTTP/0.9":  # not parsed yet: without this, no status line is written
                    self.request_version = "HTTP/1.0"
                error = ServingError(f"{message or 'bad request'}: the metrics port serves GET /metrics over HTTP/1.1")
                error.status_code = code
                self._refuse(error)

            def do_GET(self, *, head: bool = False) -> None:
                body, status = (exposition(registry), 200) if self.path.split("?")[0] in ("/metrics", "/") \
                    else (b"not found: metrics are at /metrics\n", 404)
                self._answer(status, body, head=head)

            def do_HEAD(self) -> None:
                self.do_GET(head=True)

            def _not_allowed(self) -> None:
                # NOTE: BaseHTTPRequestHandler answers a method without a do_* handler with 501 (an HTML page):
                # a known method on a read-only port is the client's mistake, 405.
                self._answer(405, b"method not allowed: the metrics port serves GET /metrics\n",
                             extra={"Allow": "GET, HEAD", "Connection": "close"})
                self.close_connection = True

            do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

            def _answer(self, status: int, body: bytes, *, head: bool = False,
                        extra: dict[str, str] | None = None, json: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if json else
                                 CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-port", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
