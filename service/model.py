"""A loaded model version: its spec, its ONNX Runtime instances, its batcher and its statistics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc

from service.batch_planner import DispatchReason
from service.batcher import Batcher, BatcherStats, BatchResult
from service.datatypes import v2_datatype
from service.errors import InvalidInput, ModelLoadError
from service.modelrepo.accelerators import GPU_PROVIDER_NAMES, gpu_options, instance_plans, provider_plan
from service.modelrepo.config import ModelSpec, completed_spec
from service.modelrepo.layout import DEFAULT_MODEL_FILENAME, model_file
from service.modelrepo.variants import fp16_variant_file, instance_model_file
from service.processing.text_input import text_input_name
from service.ragged import RaggedPolicy, ragged_policy
from service.runtime import InstancePool, InstanceSetup, classify_run_error, synthetic_inputs
from service.sequence import SequenceBatcher
from service.sequence_config import sequence_policy
from service.settings import ServerSettings
from service.stats import ModelStats

log = logging.getLogger("modelserve.model")


@dataclass
class LoadRequest:
    """What the repository found on disk for one model."""

    name: str
    model_dir: Path
    config: object  # mc.ModelConfig as read (not yet completed)
    has_file: bool
    max_batch_size_given: bool


# Request layouts ((name, dtype, shape) per input) a version remembers as valid; past this it starts over.
MAX_KNOWN_LAYOUTS = 256

# A text model's token-id input (Hugging Face's name); checked against the config's vocab_size and
# max_sequence_length parameters where the config gives them, so bad ids get 400 before ONNX Runtime runs.
TOKEN_INPUT = "input_ids"
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _config_int(spec: ModelSpec, key: str) -> int | None:
    p = spec.config.parameters.get(key)
    value = p.string_value.strip() if p is not None else ""
    return int(value) if value.isdigit() and int(value) > 0 else None


def check_tokens(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> None:
    """Token ids within [0, vocab_size) and sequences no longer than max_sequence_length, where configured."""
    shapes = {name: list(inputs[name].shape) for name in SEQUENCE_INPUTS if name in inputs}
    if len({tuple(v) for v in shapes.values()}) > 1:
        raise InvalidInput(f"model {spec.name!r}: {', '.join(shapes)} must have one shape (one token per position), "
                           f"got {shapes}")
    max_len = _config_int(spec, "max_sequence_length")
    for name in SEQUENCE_INPUTS:
        arr = inputs.get(name)
        if max_len is not None and arr is not None and arr.ndim >= 1 and arr.shape[-1] > max_len:
            raise InvalidInput(f"input {name!r}: sequence of {arr.shape[-1]} tokens is longer than model "
                               f"{spec.name!r} accepts (max_sequence_length {max_len})")
    vocab = _config_int(spec, "vocab_size")
    ids = inputs.get(TOKEN_INPUT)
    if vocab is None or ids is None or ids.size == 0 or ids.dtype.kind not in "iu":
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise InvalidInput(f"input {TOKEN_INPUT!r}: token id {bad} is outside model {spec.name!r}'s vocabulary "
                           f"[0, {vocab - 1}] (vocab_size {vocab})")


def check_utf8(name: str, arr: np.ndarray) -> None:
    """A BYTES tensor fed to an ONNX string input must be UTF-8 text: ONNX Runtime takes str, not bytes."""
    for i, item in enumerate(arr.reshape(-1)):
        if isinstance(item, bytes):
            try:
                item.decode()
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"input {name!r}: BYTES element {i} is not valid UTF-8 ({exc.reason} at byte "
                                   f"{exc.start}); this model's ONNX string input takes UTF-8 text") from None


def _shape_str(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _reshaped(arr: np.ndarray, dims: tuple[int, ...], *, batched: bool) -> np.ndarray:
    return arr.reshape(((arr.shape[0],) if batched else ()) + tuple(dims))


def _missing_inputs_message(spec: ModelSpec, *, got: list[str], missing: list[str]) -> str:
    """Triton's wording (its QA tests look for it), list formatting included."""
    def names(items: list[str]) -> str:
        return "[" + ",".join(f"'{n}'" for n in items) + "]"

    required = sum(1 for t in spec.inputs if not t.optional)
    expected = (f"expected {required} inputs" if required == len(spec.inputs)
                else f"expected number of inputs between {required} and {len(spec.inputs)}")
    return (f"{expected} but got {len(got)} inputs for model '{spec.name}'. Got input(s) {names(got)}, but missing "
            f"required input(s) {names(missing)}. Please provide all required input(s).")


def instance_setups(config: mc.ModelConfig, *, fp32: Path, fp16: Path | None, shown_as: str,
                    settings: ServerSettings) -> list[InstanceSetup]:
    """One setup per instance (service/modelrepo/accelerators.py places them): its providers with the
    config's options, and its file (the FP16 variant where the instance runs on a GPU provider)."""
    options = gpu_options(config)
    available = ort.get_available_providers()
    unknown = [p for p in settings.execution_providers or [] if p not in available]
    if unknown:
        log.warning("execution providers %s are not in this onnxruntime build (has %s)", unknown, available)
    setups = []
    for plan in instance_plans(config):
        providers, provider_options = provider_plan(plan, options, available=available,
                                                    requested=settings.execution_providers)
        path = instance_model_file(fp32, fp16=fp16, on_gpu=providers[0] in GPU_PROVIDER_NAMES,
                                   prefer_fp16=settings.gpu_fp16_variants)
        shown = shown_as if path == fp32 else f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
        setups.append(InstanceSetup(path, providers, provider_options, shown_as=shown))
    return setups


@dataclass
class ModelVersion:
    """One served version. Created by `load` (blocking, in a worker thread), then `start`ed in the loop."""

    spec: ModelSpec
    version: str
    pool: InstancePool
    stats: ModelStats
    batcher: Batcher | None = None
    sequencer: SequenceBatcher | None = None
    executor: ThreadPoolExecutor | None = None
    output_names: list[str] = field(default_factory=list)
    adaptive: bool = False  # settings.adaptive_batching
    ragged: RaggedPolicy | None = None  # the config's length-aware batching
    _string_inputs: set[str] = field(default_factory=set)
    # Input layouts already validated -> their row count: names, dtypes and shapes are checked once per
    # layout, not per request (the hot path sees the same few layouts again and again).
    _known_layouts: dict[tuple, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def text_input(self) -> str | None:
        """The BYTES input accepted in place of the token tensors (service/processing/text_input.py)."""
        return text_input_name(self.spec)

    @cached_property
    def served_config(self) -> mc.ModelConfig:
        """The config as Triton returns it: instance groups named "<model>_<i>" and KIND_AUTO resolved to
        where the instances run (clients read `kind` to tell CPU from GPU serving)."""
        config = mc.ModelConfig()
        config.CopyFrom(self.spec.config)
        providers = self.pool.providers if self.pool is not None else []
        kind = mc.ModelInstanceGroup.KIND_GPU if providers[:1] and providers[0] in GPU_PROVIDER_NAMES \
            else mc.ModelInstanceGroup.KIND_CPU
        for i, group in enumerate(config.instance_group):
            group.name = group.name or f"{config.name}_{i}"
            if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
                group.kind = kind
        return config

    @cached_property
    def _checks_values(self) -> bool:
        """Whether validation looks at values (token ids, sequence lengths), not only at the layout."""
        return any(t.name in SEQUENCE_INPUTS for t in self.spec.inputs)

    @classmethod
    def load(cls, req: LoadRequest, *, version: int, settings: ServerSettings) -> ModelVersion:
        config = req.config
        # Checked before any session is made.
        adaptive = _adaptive(config, name=req.name, default=settings.adaptive_batching)  # type: ignore[arg-type]
        filename = config.default_model_filename or DEFAULT_MODEL_FILENAME  # type: ignore[attr-defined]
        try:
            path = model_file(req.model_dir, version, filename)
        except InvalidInput as exc:
            raise ModelLoadError(f"model {req.name!r}: default_model_filename: {exc.message}") from None
        shown = f"{req.name}/{version}/{filename}"
        if not path.is_file():
            raise ModelLoadError(f"model {req.name!r} version {version}: {shown} not found")
        fp16 = fp16_variant_file(req.model_dir, name=req.name, version=version) if settings.gpu_fp16_variants else None
        setups = instance_setups(req.config, fp32=path, fp16=fp16, shown_as=shown, settings=settings)  # type: ignore[arg-type]
        try:
            pool, spec = cls._instances(req, setups, settings=settings)
        except ModelLoadError as exc:
            if not any(s.model_path == fp16 for s in setups):
                raise
            # NOTE: a variant that does not fit (FP16 inputs, another graph) must not take its parent down.
            log.warning("model %s v%s: not serving its FP16 variant (%s); serving FP32", req.name, version,
                        exc.message)
            setups = instance_setups(req.config, fp32=path, fp16=None, shown_as=shown, settings=settings)  # type: ignore[arg-type]
            pool, spec = cls._instances(req, setups, settings=settings)
        pool.configure_io_binding(mode=settings.io_binding, max_batch_size=spec.max_batch_size)
        served = sorted({str(s.shown_as) for s in setups})
        threads = pool.intra_op_threads
        log.info(
            "model %s v%s: %d instance(s) on %s serving %s, %d intra-op thread(s) each, io binding on %d, "
            "max_batch_size %d, batching %s", req.name, version, pool.count, pool.providers, served, threads,
            pool.bound, spec.max_batch_size, "on" if spec.batching else "off",
        )
        mv = cls(spec=spec, version=str(version), pool=pool, stats=ModelStats(req.name, str(version)))
        mv.output_names = [o.name for o in spec.outputs]
        mv.ragged = ragged_policy(spec, max_tokens=settings.max_batch_tokens)
        mv.adaptive = adaptive
        mv._string_inputs = {t.name for t in [*pool.graph_inputs, *pool.graph_optional] if t.datatype == "BYTES"}
        if settings.warmup:
            mv._warmup()
        return mv

    @staticmethod
    def _instances(req: LoadRequest, setups: list[InstanceSetup], *,
                   settings: ServerSettings) -> tuple[InstancePool, ModelSpec]:
        """The instances' sessions and the spec completed from their graph (load errors as ModelLoadError)."""
        config = req.config
        threads = max(1, settings.cpu_threads // len(setups))
        pool = InstancePool(setups, intra_op_threads=threads, allow_spinning=settings.allow_spinning)
        spec = completed_spec(req.model_dir, name=req.name,
                              read=(config, req.has_file, req.max_batch_size_given),  # type: ignore[arg-type]
                              graph_inputs=pool.graph_inputs, graph_outputs=pool.graph_outputs,
                              default_max_batch_size=settings.default_max_batch_size,
                              graph_optional=pool.graph_optional,
                              auto_complete=not settings.disable_auto_complete_config)
        return pool, spec

    def _warmup(self) -> None:
        batched = self.spec.max_batch_size > 0
        sizes = {1, self.spec.max_batch_size} if batched else {1}
        for size in sorted(sizes):
            feeds = synthetic_inputs(self.pool.graph_inputs, batch_size=size, batched=batched)
            try:
                self.pool.warmup(feeds, self.output_names)
            except Exception as exc:  # a model that cannot run zeros is still servable; say so
                log.warning("model %s: warm-up at batch %d failed: %s", self.name, size, exc)
                return

    def start(self) -> None:
        """Create the executor and batcher; must run inside the event loop."""
        self.executor = ThreadPoolExecutor(max_workers=self.pool.count, thread_name_prefix=f"ort-{self.name}")

        def on_queue(depth: int) -> None:
            self.stats.pending = depth

        policy = sequence_policy(self.spec.config)
        if policy is not None:
            self.sequencer = SequenceBatcher(
                model=self.name, run=self._run, executor=self.executor, policy=policy,
                max_batch_size=self.spec.max_batch_size, output_names=self.output_names,
                stats=BatcherStats(on_execution=self.stats.record_execution, on_queue_change=on_queue),
            )
            self.sequencer.start()
            return
        self.batcher = Batcher(
            model=self.name,
            run=self._run,
            executor=self.executor,
            policy=self.spec.batching,
            max_batch_size=self.spec.max_batch_size,
            concurrency=self.pool.count,
            stats=BatcherStats(on_execution=self.stats.record_execution, on_queue_change=on_queue,
                               on_dispatch=self._record_dispatch),
            adaptive=self.adaptive,
            ragged=self.ragged,
        )
        self.batcher.start()

    def _record_dispatch(self, reason: DispatchReason, rows: int) -> None:
        self.stats.record_dispatch(reason.value, rows / max(self.spec.max_batch_size, 1))

    def submit(self, *, inputs: dict[str, np.ndarray], rows: int, parameters: dict,
               client_gone: Callable[[], bool] | None = None) -> Awaitable[BatchResult]:
        """Queue a validated request on the sequence batcher or the dynamic batcher."""
        if self.sequencer is not None:
            return self.sequencer.submit(inputs=inputs, rows=rows, parameters=parameters, client_gone=client_gone)
        assert self.batcher is not None
        return self.batcher.submit(inputs=inputs, rows=rows, timeout_s=self.timeout_s(parameters),
                                   client_gone=client_gone, priority=self.priority(parameters))

    def priority(self, parameters: dict) -> int:
        """The request's priority level under the model's dynamic_batching priority_levels (0: one level)."""
        policy = self.spec.batching
        asked = parameters.get("priority", 0)
        if isinstance(asked, str) and asked.isascii() and asked.isdigit():
            asked = int(asked)
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
            raise InvalidInput(f"parameter 'priority': expected an unsigned integer (1 is the most urgent level), "
                               f"got {asked!r}")
        return policy.priority(asked) if policy is not None else 0

    def _run(self, feeds: dict[str, np.ndarray],
             names: list[str] | None = None) -> tuple[dict[str, np.ndarray], int, int]:
        for name in self._string_inputs & feeds.keys():
            # ORT takes str, not bytes, for string tensors.
            feeds[name] = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])(feeds[name])
        batched = self.spec.max_batch_size > 0
        for t in self.spec.inputs:  # Triton's reshape: served dims -> the graph's shape
            if t.reshape is not None and t.name in feeds:
                feeds[t.name] = _reshaped(feeds[t.name], t.reshape, batched=batched)
        t0 = time.perf_counter_ns()
        names = names or self.output_names
        try:
            arrays = self.pool.run(feeds, names)
        except Exception as exc:
            raise classify_run_error(exc, model=self.name, feeds=feeds) from None
        t1 = time.perf_counter_ns()
        outputs = dict(zip(names, arrays))
        for t in self.spec.outputs:  # and the graph's shape -> served dims
            if t.reshape is not None and t.name in outputs:
                outputs[t.name] = _reshaped(outputs[t.name], t.dims, batched=batched)
        return outputs, t1 - t0, time.perf_counter_ns() - t1

    async def close(self, *, grace_s: float) -> None:
        """Drain the batcher (up to grace_s), then free the ONNX Runtime sessions at once.

        NOTE: the batcher holds `self._run`, a reference cycle (version -> batcher -> bound method ->
        version) that kept the sessions alive until the cyclic garbage collector ran (a 450-1,014 MB RSS
        sawtooth over load/unload cycles). Dropping the batcher breaks the cycle; closing the pool frees the
        sessions even while something else (a task-route processor cache, a late caller) still holds us.
        """
        if self.batcher is not None:
            await self.batcher.close(grace_s=grace_s)
            self.batcher = None
        if self.sequencer is not None:
            await self.sequencer.close(grace_s=grace_s)
            self.sequencer = None
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None
        self.pool.close()

    def validate(self, inputs: dict[str, np.ndarray]) -> int:
        """Check names, dtypes and shapes against the spec; returns the request's row count."""
        layout = tuple([(name, arr.dtype, arr.shape) for name, arr in inputs.items()])
        rows = self._known_layouts.get(layout)
        if rows is None:
            rows = self._validate_layout(inputs)
            if len(self._known_layouts) >= MAX_KNOWN_LAYOUTS:
                self._known_layouts.clear()
            self._known_layouts[layout] = rows
        if self._checks_values:
            check_tokens(self.spec, inputs)
        if self._string_inputs:
            for name in self._string_inputs & inputs.keys():
                check_utf8(name, inputs[name])
        return rows

    def _validate_layout(self, inputs: dict[str, np.ndarray]) -> int:
        spec = self.spec
        expected = {t.name for t in spec.inputs}
        unknown = set(inputs) - expected
        if unknown:
            # Triton's words first (its clients' tests look for them), then every input that is not the model's.
            raise InvalidInput(f"unexpected inference input '{min(unknown)}' for model '{spec.name}': unexpected "
                               f"input(s) {sorted(unknown)}; expected {sorted(expected)}")
        missing = [t.name for t in spec.inputs if not t.optional and t.name not in inputs]
        if missing:
            raise InvalidInput(_missing_inputs_message(spec, got=list(inputs), missing=missing))
        rows = None
        for t in spec.inputs:
            arr = inputs.get(t.name)
            if arr is not None:
                rows = self._check_tensor(t, arr, rows)
        return rows if rows is not None else 1

    def _check_tensor(self, t, arr: np.ndarray, rows: int | None) -> int | None:
        got = v2_datatype(arr)
        if got != t.datatype:
            raise InvalidInput(f"input {t.name!r}: expected datatype {t.datatype}, got {got}")
        batched = self.spec.max_batch_size > 0
        full = ([-1] if batched else []) + list(t.dims)
        shape = list(arr.shape)
        ok = len(shape) == len(full) and all(d == -1 or d == s for d, s in zip(full, shape))
        if not ok or (batched and shape[0] < 1):
            raise InvalidInput(f"input {t.name!r}: expected shape {_shape_str(full)}, got {_shape_str(shape)}")
        if not batched:
            return 1
        if shape[0] > self.spec.max_batch_size:
            raise InvalidInput(
                f"input {t.name!r}: batch size {shape[0]} exceeds the model's max_batch_size {self.spec.max_batch_size}"
            )
        if rows is not None and rows != shape[0]:
            raise InvalidInput(f"input {t.name!r}: batch size {shape[0]} differs from the other inputs' {rows}")
        return shape[0]

    def timeout_s(self, parameters: dict) -> float | None:
        """The queue timeout for a request: the policy default, or the request's `timeout` (us) if allowed."""
        policy = self.spec.batching
        default = policy.default_timeout_us if policy else 0
        override = parameters.get("timeout")
        if override is not None and policy is not None and policy.allow_timeout_override:
            try:
                default = int(override)
            except (TypeError, ValueError):
                raise InvalidInput(f"parameter 'timeout': expected microseconds as an integer, got {override!r}") from None
        return default / 1e6 if default > 0 else None


_ADAPTIVE_VALUES = {"true": True, "false": False}


def _adaptive(config: mc.ModelConfig, *, name: str, default: bool) -> bool:
    """Whether the model's batcher is adaptive: its own `adaptive_batching` parameter ("false" keeps Triton's fixed
    max_queue_delay), else the server's setting. Any other value is a load error: a typo must not silently pick
    a policy (before, anything but "true" meant Triton's delay)."""
    own = config.parameters.get("adaptive_batching")
    if own is None:
        return default
    value = own.string_value.strip().lower()
    if value not in _ADAPTIVE_VALUES:
        raise ModelLoadError(f"model {name!r}: parameter adaptive_batching must be \"true\" or \"false\" "
                             f"(false: Triton's fixed max_queue_delay), got {own.string_value!r}")
    return _ADAPTIVE_VALUES[value]
