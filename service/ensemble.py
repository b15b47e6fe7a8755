"""Ensembles (Triton's `platform: "ensemble"`): a small scheduler over `ensemble_scheduling` steps.

Each step is an ordinary inference on its composing model, through the core (so it is validated, queued on
that model's own batcher — batched with other requests to that model — and counted in that model's
statistics). Steps run as soon as every tensor they read exists: independent steps run concurrently, in the
topological order of the tensors. An ensemble folder holds only config.pbtxt (and, as in Triton, an empty
version folder `1/`); its composing models are loaded before it, and it fails to load while one of them
cannot serve.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from service.batcher import BatchResult
from service.errors import ModelLoadError, ServingError
from service.model import LoadRequest, ModelVersion
from service.modelrepo.config import ModelSpec, build_spec
from service.settings import ServerSettings
from service.stats import ModelStats

log = logging.getLogger("modelserve.ensemble")

ENSEMBLE_PLATFORM = "ensemble"
Tensors = dict[str, np.ndarray]
# (model name, version or None, inputs, wanted outputs, parameters) -> outputs: one inference through the core.
StepRunner = Callable[[str, str | None, Tensors, list[str], dict], Awaitable[Tensors]]
# Request parameters an ensemble hands on to its steps: a sequence's flags reach its stateful steps, as in Triton.
FORWARDED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout")
# (model name, version or None) -> the READY version (ModelNotFound / ModelNotReady otherwise).
Lookup = Callable[[str, str | None], ModelVersion]


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM


def composing_models(config: mc.ModelConfig) -> list[str]:
    """The models an ensemble's steps call, in step order, without repeats."""
    return list(dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step))


@dataclass(frozen=True)
class EnsembleStep:
    model: str
    version: str | None
    input_map: dict[str, str]  # composing model's input -> ensemble tensor
    output_map: dict[str, str]  # composing model's output -> ensemble tensor


def _steps(config: mc.ModelConfig, lookup: Lookup) -> list[EnsembleStep]:
    where = f"ensemble {config.name!r}"
    if not config.ensemble_scheduling.step:
        raise ModelLoadError(f"{where}: ensemble_scheduling has no step; expected at least one")
    steps = []
    for s in config.ensemble_scheduling.step:
        version = str(s.model_version) if s.model_version > 0 else None
        try:
            spec = lookup(s.model_name, version).spec
        except ServingError as exc:
            raise ModelLoadError(f"{where}: step model {s.model_name!r} cannot serve: {exc.message}") from None
        step = EnsembleStep(s.model_name, version, dict(s.input_map), dict(s.output_map))
        _check_step(step, spec, where=where)
        steps.append(step)
    return steps


def _check_step(step: EnsembleStep, spec: ModelSpec, *, where: str) -> None:
    inputs, outputs = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
    required = {t.name for t in spec.inputs if not t.optional}
    if set(step.input_map) - inputs or required - set(step.input_map):
        raise ModelLoadError(f"{where}: step {step.model!r} input_map keys {sorted(step.input_map)} must name "
                             f"the model's inputs {sorted(inputs)} (all of {sorted(required)})")
    if not step.output_map or set(step.output_map) - outputs:
        raise ModelLoadError(f"{where}: step {step.model!r} output_map keys {sorted(step.output_map)} must name "
                             f"some of the model's outputs {sorted(outputs)}")


def _check_graph(config: mc.ModelConfig, steps: list[EnsembleStep]) -> None:
    """Every tensor has one producer, every step can run (no cycle), every ensemble output is produced."""
    where = f"ensemble {config.name!r}"
    available = {i.name for i in config.input}
    produced: set[str] = set()
    for s in steps:
        for tensor in s.output_map.values():
            if tensor in produced or tensor in available:
                raise ModelLoadError(f"{where}: tensor {tensor!r} is produced twice; each tensor needs one producer")
            produced.add(tensor)
    pending = list(steps)
    while pending:
        runnable = [s for s in pending if set(s.input_map.values()) <= available]
        if not runnable:
            missing = sorted({t for s in pending for t in s.input_map.values()} - available)
            raise ModelLoadError(f"{where}: steps {[s.model for s in pending]} can never run: tensors {missing} "
                                 "are neither ensemble inputs nor any step's output (or the steps form a cycle)")
        for s in runnable:
            available |= set(s.output_map.values())
        pending = [s for s in pending if s not in runnable]
    missing_out = sorted({o.name for o in config.output} - available)
    if missing_out:
        raise ModelLoadError(f"{where}: outputs {missing_out} are not produced by any step's output_map")


def _inherit_labels(spec: ModelSpec, steps: list[EnsembleStep], lookup: Lookup) -> None:
    """An ensemble output without a label_filename of its own takes the labels of the composing model's output
    mapped straight onto it, as Triton looks labels up "from the actual model" (nested ensembles pass them on)."""
    outputs = {o.name for o in spec.outputs}
    for step in steps:
        step_labels = lookup(step.model, step.version).spec.labels
        for model_output, tensor in step.output_map.items():
            if tensor in outputs and tensor not in spec.labels and model_output in step_labels:
                spec.labels[tensor] = step_labels[model_output]


@dataclass
class EnsembleVersion(ModelVersion):
    """A served ensemble: validated like a model, run by `run_steps` instead of a batcher and sessions."""

    steps: list[EnsembleStep] | None = None
    runner: StepRunner | None = None
    lookup: Lookup | None = None
    _running: set[asyncio.Task] = field(default_factory=set)

    @classmethod
    def load_ensemble(cls, req: LoadRequest, *, version: int, lookup: Lookup, runner: StepRunner,
                      settings: ServerSettings) -> EnsembleVersion:
        config = mc.ModelConfig()
        config.CopyFrom(req.config)  # type: ignore[arg-type]
        if config.name and config.name != req.name:
            raise ModelLoadError(f"model {req.name!r}: config.pbtxt names it {config.name!r}; "
                                 "the name must match its folder")
        config.name = req.name
        if not config.input or not config.output:
            raise ModelLoadError(f"ensemble {req.name!r}: config.pbtxt must list the ensemble's inputs and outputs")
        steps = _steps(config, lookup)
        _check_graph(config, steps)
        spec = build_spec(config, model_dir=req.model_dir)
        _inherit_labels(spec, steps, lookup)
        # NOTE: an ensemble owns no ONNX Runtime sessions; `pool` stays unset and is never used.
        mv = cls(spec=spec, version=str(version), pool=None, stats=ModelStats(req.name, str(version)),  # type: ignore[arg-type]
                 steps=steps, runner=runner, lookup=lookup)
        mv.output_names = [o.name for o in spec.outputs]
        log.info("ensemble %s v%s: steps %s", req.name, version, [s.model for s in steps])
        return mv

    def start(self) -> None:
        """Nothing to start: the composing models' batchers do the queueing."""

    def unavailable_reason(self) -> str | None:
        """Why the ensemble cannot serve now (None: every step can run): a composing model was unloaded, is
        not ready, or was reloaded with tensors its step no longer matches. Checked on every lookup, so the
        ensemble serves again as soon as the composing model does, with no reload of its own."""
        assert self.lookup is not None
        for step in self.steps or []:
            try:
                _check_step(step, self.lookup(step.model, step.version).spec, where=f"ensemble {self.name!r}")
            except ServingError as exc:
                return f"composing model {step.model!r} is not available: {exc.message}"
        return None

    def submit(self, *, inputs: Tensors, rows: int, parameters: dict,
               client_gone: Callable[[], bool] | None = None) -> Awaitable[BatchResult]:
        forwarded = {k: v for k, v in parameters.items() if k in FORWARDED_PARAMETERS}
        task = asyncio.get_running_loop().create_task(self._run_steps(inputs, rows, forwarded))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _run_steps(self, inputs: Tensors, rows: int, parameters: dict) -> BatchResult:
        tensors = dict(inputs)
        pending = list(self.steps or [])
        while pending:
            runnable = [s for s in pending if set(s.input_map.values()) <= tensors.keys()]
            results = await asyncio.gather(*(self._step(s, tensors, parameters) for s in runnable))
            for step, outputs in zip(runnable, results):
                for model_output, tensor in step.output_map.items():
                    tensors[tensor] = outputs[model_output]
            pending = [s for s in pending if s not in runnable]
        self.stats.record_execution(rows, (0, 0, 0))
        return BatchResult({n: tensors[n] for n in self.output_names}, 0.0, rows)

    async def _step(self, step: EnsembleStep, tensors: Tensors, parameters: dict) -> Tensors:
        assert self.runner is not None and self.lookup is not None
        feeds = {name: tensors[tensor] for name, tensor in step.input_map.items()}
        # A non-batching ensemble hands a batching step tensors that lack its batch dim as a batch of one and
        # takes row 0 back (how Triton's QA "_nobatch" ensembles call their batching nop models); tensors that
        # already carry it pass as they are.
        spec = self.lookup(step.model, step.version).spec
        dims = {t.name: len(t.dims) for t in spec.inputs}
        add_batch = (self.spec.max_batch_size == 0 and spec.max_batch_size > 0
                     and all(v.ndim == dims.get(n) for n, v in feeds.items()))
        if add_batch:
            feeds = {name: value[np.newaxis] for name, value in feeds.items()}
        try:
            outputs = await self.runner(step.model, step.version, feeds, list(step.output_map), parameters)
            return {name: value[0] for name, value in outputs.items()} if add_batch else outputs
        except ServingError as exc:
            # Triton's wording first ("in ensemble 'x', ..."), then what the step said; same status.
            err = copy.copy(exc)
            err.message = f"in ensemble '{self.name}', step model '{step.model}': {exc.message}"
            err.args = (err.message,)
            raise err from None

    async def close(self, *, grace_s: float) -> None:
        if self._running:
            await asyncio.wait(list(self._running), timeout=grace_s)
