"""The autoscaling expressions, evaluated by Prometheus' own engine (`promtool test rules`) on two models' series.

Needs Debian's `prometheus` package (promtool); .ci/run installs it. Skipped, with the reason, without it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RULES = REPO_ROOT / "helm" / "autoscaling" / "modelserve.rules.yaml"
ADAPTER_VALUES = REPO_ROOT / "helm" / "autoscaling" / "prometheus-adapter-values.yaml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

# Pod a serves two busy models: cnn at 10 req/s waiting 1 ms each, speech at 1 req/s waiting 100 ms each.
# The average wait of a request in pod a is (10*1000 + 1*100000) / 11 = 10000 us.
# Pod b has one model at 4 req/s waiting 5 ms, and one idle model: its average is 5000 us.
# Pod c has had no traffic in the window: 0, not NaN.
# Samples every 15 s; counters grow by rate*15 per sample.
SERIES = [
    ('nv_inference_request_success{pod="a",model="cnn",version="1"}', "0+150x40"),
    ('nv_inference_queue_duration_us{pod="a",model="cnn",version="1"}', "0+150000x40"),
    ('nv_inference_request_success{pod="a",model="speech",version="1"}', "0+15x40"),
    ('nv_inference_queue_duration_us{pod="a",model="speech",version="1"}', "0+1500000x40"),
    ('nv_inference_request_success{pod="b",model="cnn",version="1"}', "0+60x40"),
    ('nv_inference_queue_duration_us{pod="b",model="cnn",version="1"}', "0+300000x40"),
    ('nv_inference_request_success{pod="b",model="speech",version="1"}', "42x40"),
    ('nv_inference_queue_duration_us{pod="b",model="speech",version="1"}', "4200000x40"),
    ('nv_inference_request_success{pod="c",model="cnn",version="1"}', "100x40"),
    ('nv_inference_queue_duration_us{pod="c",model="cnn",version="1"}', "900000x40"),
    ('nv_inference_pending_request_count{pod="a",model="cnn",version="1"}', "3x40"),
    ('nv_inference_pending_request_count{pod="a",model="speech",version="1"}', "4x40"),
    ('nv_inference_pending_request_count{pod="b",model="cnn",version="1"}', "0x40"),
]


def _promtool_test(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess:
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": [{"series": s, "values": v} for s, v in SERIES], **t}
                  for t in tests],
    }
    path = tmp_path / "queue_time_test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_queue_time_per_request_sums_models_before_dividing(tmp_path):
    result = _promtool_test(tmp_path, [{
        "promql_expr_test": [
            {"expr": "pod:modelserve_queue_time_us_per_request:rate1m", "eval_time": "5m", "exp_samples": [
                {"labels": 'pod:modelserve_queue_time_us_per_request:rate1m{pod="a"}', "value": 10000},
                {"labels": 'pod:modelserve_queue_time_us_per_request:rate1m{pod="b"}', "value": 5000},
                {"labels": 'pod:modelserve_queue_time_us_per_request:rate1m{pod="c"}', "value": 0},
            ]},
            # What a per-model ratio averaged over models (the shape of Triton's example) reports for the same
            # traffic: pod a 50500 (its 1 req/s model weighs as much as the 10 req/s one), pod b 5000/2 = 2500
            # (the idle model halves it: 1/N with N models). Kept as a witness of why we sum first.
            {"expr": "avg by (pod) (rate(nv_inference_queue_duration_us[1m]) "
                     "/ clamp_min(rate(nv_inference_request_success[1m]), 1e-9))",
             "eval_time": "5m", "exp_samples": [
                 {"labels": '{pod="a"}', "value": 50500},
                 {"labels": '{pod="b"}', "value": 2500},
                 {"labels": '{pod="c"}', "value": 0},
             ]},
        ],
    }])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_pending_requests_summed_per_pod(tmp_path):
    result = _promtool_test(tmp_path, [{
        "promql_expr_test": [
            {"expr": "pod:modelserve_pending_requests:sum", "eval_time": "5m", "exp_samples": [
                {"labels": 'pod:modelserve_pending_requests:sum{pod="a"}', "value": 7},
                {"labels": 'pod:modelserve_pending_requests:sum{pod="b"}', "value": 0},
            ]},
        ],
    }])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_file_is_valid():
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_recording_rules_and_adapter_rules_are_the_same_expressions():
    """One expression in three places (chart, adapter values, recording rules): they must not drift."""
    recorded = {r["record"]: r["expr"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}
    adapter = {r["name"]["as"]: r["metricsQuery"] for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}

    def as_recorded(query: str) -> str:
        return query.replace("<<.GroupBy>>", "pod").replace("{<<.LabelMatchers>>}", "")

    assert as_recorded(adapter["modelserve_queue_time_us_per_request"]) == recorded[
        "pod:modelserve_queue_time_us_per_request:rate1m"]
    assert as_recorded(adapter["modelserve_pending_requests"]) == recorded["pod:modelserve_pending_requests:sum"]
