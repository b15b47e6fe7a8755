"""The OpenAI embeddings route used as OpenAI's users use it: one line per call through the real `openai` client
(sync and AsyncOpenAI), saying what came back. The "before / now" table of docs/RELIABILITY.md ("OpenAI route,
round 6") is this script's output against the tiny zoo.

    python -m loadtests.openai_probe 127.0.0.1:8000 [--model transformer]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

import numpy as np
import openai

TEXTS = ["Open a file and read it line by line.", "Compress a folder into a zip archive."]


def _rows(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], np.float32)


def _outcome(call: Callable[[], object]) -> str:
    try:
        return f"200 {call()}"
    except openai.APIStatusError as exc:
        return f"{exc.status_code} {type(exc).__name__}: {exc.message[:140]}"
    except Exception as exc:  # the client itself failing (a parse error, a missing field) is an outcome too
        return f"client error {type(exc).__name__}: {str(exc)[:140]}"


def _concurrent(url: str, model: str, client: openai.OpenAI) -> str:
    """Batches of one corpus in flight at once (LangChain's aembed_documents pattern): the largest difference
    between a vector and the same text embedded alone."""
    texts = [f"document {i} about {t}" for i, t in enumerate(["files", "zip", "sockets", "json"] * 12)]
    alone = np.array([_rows(client.embeddings.create(model=model, input=t))[0] for t in texts])

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"http://{url}/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.embeddings.create(model=model, input=texts[i:i + 5])
                                          for i in range(0, len(texts), 5)))

    together = np.concatenate([_rows(r) for r in asyncio.run(run())])
    return f"{len(texts)} texts in {len(range(0, len(texts), 5))} concurrent batches, max |diff| to alone " \
           f"{np.abs(together - alone).max():.1e}"


def calls(url: str, model: str) -> dict[str, Callable[[], object]]:
    client = openai.OpenAI(base_url=f"http://{url}/v1", api_key="unused", max_retries=0)

    def create(**kwargs) -> Callable[[], object]:
        return lambda: f"{len(client.embeddings.create(model=model, **kwargs).data)} vectors"

    def default_equals_float() -> str:
        floats = _rows(client.embeddings.create(model=model, input=TEXTS, encoding_format="float"))
        return f"equal: {np.array_equal(_rows(client.embeddings.create(model=model, input=TEXTS)), floats)}"

    def raw_headers() -> str:
        raw = client.embeddings.with_raw_response.create(model=model, input=TEXTS[0])
        return str({k: v for k, v in raw.headers.items() if k not in ("date", "content-length")})

    return {
        "input: a string": create(input=TEXTS[0]),
        "input: a list of strings": create(input=TEXTS),
        "input: a list of token ids": create(input=[101, 7592, 102]),
        "input: a list of lists of token ids": create(input=[[101, 7592, 102]]),
        "default (base64) decoded vs float": default_equals_float,
        "dimensions=8": create(input=TEXTS[0], dimensions=8),
        "user='u-1'": create(input=TEXTS[0], user="u-1"),
        "input: ''": create(input=""),
        "input: []": create(input=[]),
        "input: 2048 strings": create(input=["a"] * 2048),
        "input: 2049 strings": create(input=["a"] * 2049),
        "input: 3000 words": lambda: client.embeddings.create(model=model, input="word " * 3000).usage,
        "input: 70,000 characters": create(input="x" * 70_000),
        "extra_body={'truncate': True}": create(input=TEXTS[0], extra_body={"truncate": True}),
        "model='nope'": lambda: client.embeddings.create(model="nope", input="hi"),
        "models.list()": lambda: [m.id for m in client.models.list()],
        "models.retrieve(model).id": lambda: client.models.retrieve(model).id,
        "models.retrieve('nope')": lambda: client.models.retrieve("nope"),
        "with_raw_response headers": raw_headers,
        "usage for 2 texts": lambda: client.embeddings.create(model=model, input=TEXTS).usage,
        "AsyncOpenAI concurrent batches": lambda: _concurrent(url, model, client),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="HOST:PORT of a running server")
    parser.add_argument("--model", default="transformer")
    args = parser.parse_args(argv)
    for name, call in calls(args.url, args.model).items():
        print(f"| {name} | {_outcome(call)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
