"""Triton's `sequence_batching` block, read once at load time: strategy, control inputs and implicit state.

The server fills control inputs (START, END, READY, CORRID) and state inputs itself; clients never send them,
so they are not in the model's client-visible inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from service.datatypes import NUMPY_TO_V2, V2_TO_NUMPY, config_to_v2
from service.errors import InvalidInput, ModelLoadError

# Triton's default max_sequence_idle_microseconds.
DEFAULT_IDLE_US = 1_000_000
_KINDS = {
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START: "START",
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END: "END",
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY: "READY",
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID: "CORRID",
}

SequenceId = int | str
# The datatypes Triton allows for a CORRID control, as V2 datatypes.
_CONFIG_CORRID_TYPES = {mc.TYPE_UINT64: "UINT64", mc.TYPE_INT64: "INT64", mc.TYPE_UINT32: "UINT32",
                        mc.TYPE_INT32: "INT32", mc.TYPE_STRING: "BYTES"}


@dataclass(frozen=True)
class ControlInput:
    """One control tensor the server feeds: `kind` is START, END, READY or CORRID."""

    name: str
    kind: str
    dtype: np.dtype
    false_value: float | int | bool = 0
    true_value: float | int | bool = 1

    def value(self, *, flag: bool, corrid: SequenceId = 0) -> object:
        if self.kind == "CORRID":
            return corrid_value(corrid, dtype=self.dtype)
        return self.true_value if flag else self.false_value


@dataclass(frozen=True)
class StateTensor:
    """An implicit state: fed as `input_name`, taken back from `output_name` after each step."""

    input_name: str
    output_name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    initial: np.ndarray | None = None  # None: zeros


@dataclass(frozen=True)
class SequencePolicy:
    strategy: Literal["direct", "oldest"]
    idle_s: float
    max_queue_delay_s: float
    controls: tuple[ControlInput, ...] = ()
    states: tuple[StateTensor, ...] = ()
    preferred_batch_sizes: tuple[int, ...] = field(default=())

    def server_inputs(self) -> set[str]:
        return {c.name for c in self.controls} | {s.input_name for s in self.states}

    def server_outputs(self) -> set[str]:
        return {s.output_name for s in self.states}


def corrid_value(corrid: SequenceId, *, dtype: np.dtype, model: str = "") -> object:
    """A sequence id as the CORRID control's datatype. NOTE: more lenient than Triton, which refuses a string
    id for an integer CORRID and an integer id for a string one: a decimal string id is taken as its number,
    an integer id as its decimal string."""
    if dtype == np.object_:
        return str(corrid).encode()
    try:
        value = int(corrid)
    except ValueError:
        # Triton's words first (qa/L0_sequence_corrid_batcher compares them), then what would work.
        raise InvalidInput(
            f"sequence batching control 'CORRID' data-type is 'BYTES', but model '{model}' expects "
            f"'{NUMPY_TO_V2[np.dtype(dtype)]}': got the string sequence id {corrid!r}; send an integer sequence_id "
            "(or a decimal string)"
        ) from None
    limits = np.iinfo(dtype)
    if not limits.min <= value <= limits.max:  # fed as that integer type: out of range is the client's error
        raise InvalidInput(f"parameter 'sequence_id': {corrid!r} does not fit the CORRID control of model "
                           f"'{model}' ({NUMPY_TO_V2[np.dtype(dtype)]}: {limits.min} to {limits.max})")
    return value


def _control(name: str, ctrl: mc.ModelSequenceBatching.Control, *, model: str) -> ControlInput:
    kind = _KINDS.get(ctrl.kind)
    if kind is None:
        raise ModelLoadError(f"model {model!r} control input {name!r}: unsupported control kind {ctrl.kind}")
    if kind == "CORRID":
        datatype = _CONFIG_CORRID_TYPES.get(ctrl.data_type)
        if datatype is None:
            raise ModelLoadError(f"model {model!r} control input {name!r}: a CORRID control's data_type must be "
                                 f"one of {', '.join(mc.DataType.Name(t) for t in _CONFIG_CORRID_TYPES)}, got "
                                 f"{mc.DataType.Name(ctrl.data_type)}")
        return ControlInput(name, kind, V2_TO_NUMPY[datatype])
    for attr, dtype in (("int32_false_true", np.int32), ("fp32_false_true", np.float32),
                        ("bool_false_true", np.bool_)):
        values = list(getattr(ctrl, attr))
        if values:
            if len(values) != 2:
                raise ModelLoadError(f"model {model!r} control input {name!r}: {attr} needs [false, true], "
                                     f"got {values}")
            return ControlInput(name, kind, np.dtype(dtype), values[0], values[1])
    raise ModelLoadError(f"model {model!r} control input {name!r}: give int32_false_true, fp32_false_true or "
                         "bool_false_true")


def _state(s: mc.ModelSequenceBatching.State, *, model: str) -> StateTensor:
    dtype = V2_TO_NUMPY[config_to_v2(s.data_type)]
    dims = tuple(int(d) for d in s.dims)
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"model {model!r} state {s.input_name!r}: dims {list(dims)} must be fixed (>= 0)")
    initial = None
    for init in s.initial_state:
        if init.data_file:
            raise ModelLoadError(f"model {model!r} state {s.input_name!r}: initial_state data_file is not "
                                 "supported; use zero_data")
        initial = np.zeros([int(d) for d in init.dims] or dims, dtype=dtype)
    return StateTensor(s.input_name, s.output_name, dtype, dims, initial)


def sequence_policy(config: mc.ModelConfig) -> SequencePolicy | None:
    """The policy of a config with `sequence_batching`, else None."""
    if not config.HasField("sequence_batching"):
        return None
    sb = config.sequence_batching
    oldest = sb.WhichOneof("strategy_choice") == "oldest"
    delay_us = sb.oldest.max_queue_delay_microseconds if oldest else sb.direct.max_queue_delay_microseconds
    controls = tuple(_control(ci.name, c, model=config.name) for ci in sb.control_input for c in ci.control)
    return SequencePolicy(
        strategy="oldest" if oldest else "direct",
        idle_s=(sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US) / 1e6,
        max_queue_delay_s=delay_us / 1e6,
        controls=controls,
        states=tuple(_state(s, model=config.name) for s in sb.state),
        preferred_batch_sizes=tuple(sorted(sb.oldest.preferred_batch_size)) if oldest else (),
    )


def server_fed_names(config: mc.ModelConfig) -> tuple[set[str], set[str]]:
    """Graph inputs and outputs the server handles itself (controls, states): not client-visible tensors."""
    if not config.HasField("sequence_batching"):
        return set(), set()
    sb = config.sequence_batching
    inputs = {ci.name for ci in sb.control_input} | {s.input_name for s in sb.state}
    return inputs, {s.output_name for s in sb.state}
