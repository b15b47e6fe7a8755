"""Triton's example sequence models, rebuilt as tiny ONNX graphs with the behaviour NVIDIA's own example clients
(simple_*_sequence_*_client.py) check, so those clients run unchanged against modelserve:

  * simple_sequence: INPUT INT32 [1] with START and READY controls; OUTPUT = INPUT + START (stateless: the
    server only feeds the controls);
  * simple_dyna_sequence: also END and CORRID (UINT64): OUTPUT = INPUT + START + END * CORRID;
  * simple_string_dyna_sequence: an accumulator over implicit state (ACC_IN -> ACC_OUT kept by the server):
    OUTPUT = ACC + INPUT (+ CORRID on END), string sequence ids must be decimal (CORRID is UINT64);
  * accumulator: the plain running sum over implicit state, with READY gating.
All batch (max_batch_size 8); `strategy` picks Triton's direct or oldest sequence batcher.
"""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto, helper

from tests.onnx_builders import _save, write_config

I32, U64 = TensorProto.INT32, TensorProto.UINT64


def _vi(name: str, dtype: int = I32):
    return helper.make_tensor_value_info(name, dtype, ["N", 1])


def _control(name: str, kind: str) -> str:
    if kind == "CONTROL_SEQUENCE_CORRID":
        return f'{{ name: "{name}" control [{{ kind: {kind} data_type: TYPE_UINT64 }}] }}'
    return f'{{ name: "{name}" control [{{ kind: {kind} int32_false_true: [0, 1] }}] }}'


def _config(name: str, *, controls: list[tuple[str, str]], strategy: str, idle_us: int, state: str = "") -> str:
    ctrl = ",\n    ".join(_control(n, k) for n, k in controls)
    delay = "max_queue_delay_microseconds: 0"
    return f"""name: "{name}"
max_batch_size: 8
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  {strategy} {{ {delay} }}
  control_input [
    {ctrl}
  ]
  {state}
}}
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


_STATE = 'state [{ input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] }]'
_START_READY = [("START", "CONTROL_SEQUENCE_START"), ("READY", "CONTROL_SEQUENCE_READY")]
_DYNA = [*_START_READY, ("END", "CONTROL_SEQUENCE_END"), ("CORRID", "CONTROL_SEQUENCE_CORRID")]


def simple_sequence(root: Path, *, name: str = "simple_sequence", strategy: str = "direct",
                    idle_us: int = 5_000_000) -> None:
    nodes = [helper.make_node("Add", ["INPUT", "START"], ["OUTPUT"])]
    graph = helper.make_graph(nodes, name, [_vi("INPUT"), _vi("START"), _vi("READY")], [_vi("OUTPUT")])
    _save(graph, root / name / "1" / "model.onnx")
    write_config(root / name, _config(name, controls=_START_READY, strategy=strategy, idle_us=idle_us))


def _corrid_on_end() -> list:
    return [
        helper.make_node("Cast", ["CORRID"], ["corrid32"], to=I32),
        helper.make_node("Mul", ["corrid32", "END"], ["bonus"]),
    ]


def simple_dyna_sequence(root: Path, *, name: str = "simple_dyna_sequence", strategy: str = "direct",
                         idle_us: int = 5_000_000) -> None:
    nodes = [*_corrid_on_end(), helper.make_node("Add", ["INPUT", "START"], ["plus_start"]),
             helper.make_node("Add", ["plus_start", "bonus"], ["OUTPUT"])]
    inputs = [_vi("INPUT"), _vi("START"), _vi("READY"), _vi("END"), _vi("CORRID", U64)]
    _save(helper.make_graph(nodes, name, inputs, [_vi("OUTPUT")]), root / name / "1" / "model.onnx")
    write_config(root / name, _config(name, controls=_DYNA, strategy=strategy, idle_us=idle_us))


def simple_string_dyna_sequence(root: Path, *, name: str = "simple_string_dyna_sequence",
                                strategy: str = "direct", idle_us: int = 5_000_000) -> None:
    nodes = [*_corrid_on_end(), helper.make_node("Mul", ["INPUT", "READY"], ["gated"]),
             helper.make_node("Add", ["ACC_IN", "gated"], ["sum"]),
             helper.make_node("Add", ["sum", "bonus"], ["OUTPUT"]),
             helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"])]
    inputs = [_vi("INPUT"), _vi("START"), _vi("READY"), _vi("END"), _vi("CORRID", U64), _vi("ACC_IN")]
    _save(helper.make_graph(nodes, name, inputs, [_vi("OUTPUT"), _vi("ACC_OUT")]), root / name / "1" / "model.onnx")
    write_config(root / name, _config(name, controls=_DYNA, strategy=strategy, idle_us=idle_us, state=_STATE))


def accumulator(root: Path, *, name: str = "accumulator", strategy: str = "direct",
                idle_us: int = 5_000_000) -> None:
    """OUTPUT = running sum of INPUT over the sequence (state reset to zeros on START by the server)."""
    nodes = [helper.make_node("Mul", ["INPUT", "READY"], ["gated"]),
             helper.make_node("Add", ["ACC_IN", "gated"], ["OUTPUT"]),
             helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"])]
    inputs = [_vi("INPUT"), _vi("START"), _vi("READY"), _vi("ACC_IN")]
    _save(helper.make_graph(nodes, name, inputs, [_vi("OUTPUT"), _vi("ACC_OUT")]), root / name / "1" / "model.onnx")
    write_config(root / name, _config(name, controls=_START_READY, strategy=strategy, idle_us=idle_us, state=_STATE))


def sequence_repository(root: Path) -> Path:
    """Triton's three example sequence models plus accumulators for both strategies, and a short-idle one."""
    simple_sequence(root)
    simple_dyna_sequence(root)
    simple_string_dyna_sequence(root)
    accumulator(root, name="acc_direct", strategy="direct")
    accumulator(root, name="acc_oldest", strategy="oldest")
    accumulator(root, name="acc_idle", idle_us=200_000)
    return root
