"""Triton's trace extension on OpenTelemetry: settings (global and per model), sampling, and spans.

A traced request becomes one "InferRequest" span with children "decode", "queue", "compute" and "encode".
The transports ask `Tracing.begin(model)` only when `Tracing.enabled` is true, so the hot path costs one
attribute check while tracing is off. Sampling follows Triton: `trace_rate` N traces one request in N (the
first, then every Nth), `trace_count` caps how many more traces are taken (-1: no cap) and counts down.

Spans are exported with the OpenTelemetry SDK: as JSON lines into `trace_file` (the SDK's console exporter
writing to that file) and, in `trace_mode opentelemetry` with an endpoint, over OTLP/HTTP.
NOTE: `log_frequency` is kept and reported for Triton's clients, but spans are written as each trace ends
(as log_frequency 1 would), never held back.
"""

from __future__ import annotations

import threading
import time
from typing import IO, Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode, Tracer, set_span_in_context

from service import __version__
from service.errors import InvalidInput

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")
Setting = str | list[str]
_MAX_SETTING = 2**31 - 1


def _as_int(key: str, value: str, *, minimum: int) -> str:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if not minimum <= number <= _MAX_SETTING:  # Triton parses these as 32-bit integers
        raise InvalidInput(f"trace setting '{key}': expected an integer from {minimum} to {_MAX_SETTING}, "
                           f"got {value!r:.80}")
    return str(number)


def check_setting(key: str, value: object) -> Setting:
    """One trace setting as Triton reports it (strings; trace_level a list), or InvalidInput saying why."""
    if key not in KEYS:
        raise InvalidInput(f"unknown trace setting '{key}'; expected one of {list(KEYS)}")
    if key == "trace_level":
        levels = [str(v).upper() for v in (value if isinstance(value, list) else [value])]
        if not levels or not all(v in LEVELS for v in levels):
            raise InvalidInput(f"trace setting 'trace_level': expected a list of {list(LEVELS)}, got {value!r}")
        upper = sorted(set(levels), key=LEVELS.index)
        return ["OFF"] if upper == ["OFF"] else [v for v in upper if v != "OFF"]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InvalidInput(f"trace setting '{key}': expected a string, got {value!r}")
    value = str(value)
    if key == "trace_rate":
        return _as_int(key, value, minimum=1)
    if key == "trace_count":
        return _as_int(key, value, minimum=-1)
    if key == "log_frequency":
        return _as_int(key, value, minimum=0)
    if key == "trace_mode" and value not in ("triton", "opentelemetry"):
        raise InvalidInput(f"trace setting 'trace_mode': expected 'triton' or 'opentelemetry', got {value!r}")
    return value


class _Scope:
    """Settings given at one level (global, or one model's overrides) and its sampling counters."""

    def __init__(self, values: dict[str, Setting]) -> None:
        self.values = values
        self.seen = 0
        self.remaining = -1


class Tracing:
    """The server's trace settings and the OpenTelemetry tracer they drive."""

    def __init__(self, settings: Any) -> None:
        defaults: dict[str, Setting] = {
            "trace_level": [v.upper() for v in settings.trace_level], "trace_rate": str(settings.trace_rate),
            "trace_count": str(settings.trace_count), "log_frequency": str(settings.trace_log_frequency),
            "trace_file": str(settings.trace_file or ""), "trace_mode": settings.trace_mode,
        }
        # The start-up values: clearing a global setting (a null value) restores its one, as Triton does.
        self._defaults = {k: check_setting(k, v) for k, v in defaults.items()}
        self._global = _Scope(dict(self._defaults))
        self._global.remaining = int(str(self._global.values["trace_count"]))
        self._models: dict[str, _Scope] = {}
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self.provider = TracerProvider(resource=Resource.create({"service.name": "modelserve",
                                                                 "service.version": __version__}))
        if settings.trace_file:
            self._file = open(settings.trace_file, "a", encoding="utf-8")  # closed in shutdown()
            self.add_exporter(ConsoleSpanExporter(out=self._file,
                                                  formatter=lambda span: span.to_json(indent=None) + "\n"))
        if settings.trace_mode == "opentelemetry" and settings.trace_otlp_endpoint:
            # NOTE: imported here: only an OTLP deployment needs the exporter's protobuf/HTTP stack.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.trace_otlp_endpoint)))
        self.tracer: Tracer = self.provider.get_tracer("modelserve")
        self.enabled = False
        self._refresh()

    def add_exporter(self, exporter: SpanExporter) -> None:
        """Export every finished span to `exporter` as it ends (file, or an in-memory exporter in tests)."""
        self.provider.add_span_processor(SimpleSpanProcessor(exporter))

    # ------------------------------------------------------------------ settings

    def _effective(self, model: str | None) -> dict[str, Setting]:
        values = dict(self._global.values)
        scope = self._models.get(model) if model else None
        if scope is not None:
            values.update(scope.values)
        remaining = (scope if scope is not None and "trace_count" in scope.values else self._global).remaining
        values["trace_count"] = str(remaining)
        return values

    def settings(self, model: str | None = None) -> dict[str, Setting]:
        with self._lock:
            return self._effective(model)

    def update(self, model: str | None, changes: dict[str, object]) -> dict[str, Setting]:
        """Apply Triton's update: listed settings change; a null value clears a model's override (back to the
        global value) or a global setting (back to its start-up value). trace_file cannot change over the
        network (it names a server path)."""
        checked = {k: (None if v is None or v == [] else check_setting(k, v)) for k, v in changes.items()}
        if "trace_file" in checked:
            raise InvalidInput("trace file location can not be updated through network protocol; set it when the "
                               "server starts (--trace-file)")
        with self._lock:
            scope = self._global if not model else self._models.setdefault(model, _Scope({}))
            for key, value in checked.items():
                if value is not None:
                    scope.values[key] = value
                elif scope is self._global:
                    scope.values[key] = self._defaults[key]
                else:
                    scope.values.pop(key, None)
            scope.seen = 0
            if "trace_count" in checked:
                count = scope.values.get("trace_count", self._global.values["trace_count"])
                scope.remaining = int(str(count))
            if model and not scope.values:
                del self._models[model]
            self._refresh()
            return self._effective(model)

    def _refresh(self) -> None:
        scopes = [self._global, *self._models.values()]
        self.enabled = any(s.values.get("trace_level", self._global.values["trace_level"]) != ["OFF"]
                           for s in scopes)

    # ------------------------------------------------------------------ sampling and spans

    def begin(self, model: str) -> RequestTrace | None:
        """A trace for this request when it is sampled, else None."""
        with self._lock:
            values = self._effective(model)
            if values["trace_level"] == ["OFF"]:
                return None
            scope = self._models.get(model, self._global)
            counter = scope if "trace_count" in scope.values else self._global
            if counter.remaining == 0:
                return None
            take = scope.seen % int(str(values["trace_rate"])) == 0
            scope.seen += 1
            if not take:
                return None
            if counter.remaining > 0:
                counter.remaining -= 1
        return RequestTrace(self.tracer, model=model, tensors="TENSORS" in values["trace_level"])

    def shutdown(self) -> None:
        self.provider.shutdown()
        if self._file is not None:
            self._file.close()


class RequestTrace:
    """One sampled request: wall-clock marks taken along the way, turned into spans when it ends."""

    def __init__(self, tracer: Tracer, *, model: str, tensors: bool) -> None:
        self.tracer, self.model, self.tensors = tracer, model, tensors
        self.start_ns = time.time_ns()
        self.decoded_ns = self.start_ns
        self.batch_ns = 0
        self.queue_ns = 0
        self.compute_ns = 0
        self.attributes: dict[str, Any] = {"model_name": model}

    def decoded(self, req: Any) -> None:
        self.decoded_ns = time.time_ns()
        if req.id:
            self.attributes["request_id"] = req.id
        if self.tensors:
            for name, arr in req.inputs.items():
                self.attributes[f"input.{name}.shape"] = list(arr.shape)
                self.attributes[f"input.{name}.dtype"] = str(arr.dtype)

    def batch(self, *, queue_ns: int, timings_ns: tuple[int, int, int], rows: int) -> None:
        """Called by the core when the batch holding this request has run."""
        self.batch_ns = time.time_ns()
        self.queue_ns, self.compute_ns = queue_ns, sum(timings_ns)
        self.attributes["batch_rows"] = rows

    def end(self, *, version: str | None = None, error: BaseException | None = None) -> None:
        end_ns = time.time_ns()
        if version:
            self.attributes["model_version"] = version
        root = self.tracer.start_span("InferRequest", start_time=self.start_ns, attributes=self.attributes)
        ctx = set_span_in_context(root)
        self._child("decode", self.start_ns, self.decoded_ns, ctx)
        if self.batch_ns:
            compute_start = self.batch_ns - self.compute_ns
            self._child("queue", max(self.decoded_ns, compute_start - self.queue_ns), compute_start, ctx)
            self._child("compute", compute_start, self.batch_ns, ctx)
            self._child("encode", self.batch_ns, end_ns, ctx)
        if error is not None:
            root.set_status(Status(StatusCode.ERROR, str(error)))
        root.end(end_time=end_ns)

    def _child(self, name: str, start: int, end: int, ctx: Any) -> None:
        span: Span = self.tracer.start_span(name, context=ctx, start_time=start)
        span.end(end_time=max(start, end))
