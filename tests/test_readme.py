"""The README's own examples, run as written against a real server on the tiny zoo.

Only the host:port is rewritten; the files the curl lines upload (digit.png, yes.wav) are made here under
those names. If an example in the README changes, this test runs the new one.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.task_media import digit_file, held_out_digits, keyword_audio, wav_bytes

README = (REPO_ROOT / "README.md").read_text()
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the README's examples use curl")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def curl_lines() -> list[str]:
    return [line for block in code_blocks("bash") for line in block.splitlines() if line.startswith("curl ")]


@pytest.fixture(scope="module")
def served(zoo_server, tmp_path_factory):
    """(host:port of a real server, a folder holding digit.png and yes.wav)."""
    media = tmp_path_factory.mktemp("readme-media")
    images8, _, _ = held_out_digits(1)
    (media / "digit.png").write_bytes(digit_file(images8[0]))
    (media / "yes.wav").write_bytes(wav_bytes(keyword_audio("yes"), rate=22050))
    yield zoo_server, media  # the session's shared zoo server: README's examples only ask it


def run_curl(line: str, *, url: str, cwd) -> tuple[int, dict]:
    argv = shlex.split(line.replace("localhost:8000", url), comments=True)
    done = subprocess.run([*argv, "-sS", "-w", "\n%{http_code}"], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def zoo_row(model: str) -> str:
    return next(line for line in README.splitlines() if line.startswith(f"| `{model}` |"))


def test_every_curl_example_answers_within_the_model_domain(served):
    url, media = served
    labels = {m["name"]: m["labels"] for m in httpx.get(f"http://{url}/v1/models", timeout=30).json()["models"]}
    # The README's "What the zoo models know" names exactly the labels the models have.
    for model in ("transformer-classifier", "speech"):
        assert sorted(re.findall(r"`(\w+)`", zoo_row(model).split("|")[4].split(". ")[0])) == sorted(labels[model])
    assert labels["cnn"] == [str(d) for d in range(10)] and "`0`–`9`" in zoo_row("cnn")

    by_model = {re.search(r"/v1/models/([\w-]+)/predict", line)[1]: line for line in curl_lines()}  # type: ignore[index]
    assert sorted(by_model) == ["cnn", "recommender", "speech", "transformer-classifier"]
    answers = {}
    for model, line in by_model.items():
        status, doc = run_curl(line, url=url, cwd=media)
        assert status == 200, (line, doc)
        answers[model] = doc["results"][0]
    # The tiny zoo's models are too small to be right every time; their answers are from their domain.
    for model in ("cnn", "speech", "transformer-classifier"):
        predictions = answers[model]["predictions"]
        probs = [p["probability"] for p in predictions]
        assert predictions and {p["label"] for p in predictions} <= set(labels[model]), model
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5, model
    assert answers["speech"]["audio"]["sample_rate"] == 22050
    rec = answers["recommender"]
    assert rec["user_id"] == 7 and len(rec["items"]) == 10 and "fallback" not in rec  # a known user


def test_form_encoded_body_gets_a_415_naming_the_flag(served):
    url, media = served
    line = next(line for line in curl_lines() if "transformer-classifier" in line).replace("--json", "-d")
    status, doc = run_curl(line, url=url, cwd=media)
    assert status == 415 and "--json" in doc["error"] and "Content-Type: application/json" in doc["error"]


def test_python_snippets_run_as_written(served):
    url, media = served
    outputs = {}
    for code in code_blocks("python"):  # every block runs as written, only the address rewritten
        run = subprocess.run([sys.executable, "-c", code.replace("localhost:8000", url)],
                             cwd=media, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{code}\n{run.stderr}"
        outputs[code] = run.stdout
    cnn = next(out for code, out in outputs.items() if '"cnn"' in code)
    probs = [float(x) for x in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", cnn)]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-3
    assert next(out for code, out in outputs.items() if "openai" in code).split() == ["2", "384"]
    assert next(out for code, out in outputs.items() if '"text"' in code).strip() == "(2, 384)"
