"""The transformer family's export (round 8): eager attention, a graph ORT's symbolic shape inference follows
(so INT8 pre-processing runs it instead of falling back), and the same answers as Hugging Face's own BERT path
(SDPA attention, its own mask and positions, F.normalize) at batch 1 and on a ragged, masked batch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from export import quantize
from export.int8_measure import kernel_counts
from models.common import ort_session
from models.transformer_text import (
    PROBE_SENTENCES,
    TextClassifier,
    export_classifier,
    export_text_model,
    load_encoder,
    load_tokenizer,
    minilm_dir,
    tokenize,
)

RAGGED = [PROBE_SENTENCES[9], PROBE_SENTENCES[7], " ".join(PROBE_SENTENCES[:4])]  # 4, ~20 and ~60 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_dir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    """MiniLM's first layer (real weights) exported as `modelserve build --profile tiny` does, plus the
    classifier joined to a seeded random head."""
    work = tmp_path_factory.mktemp("text_export")
    encoder = load_encoder(minilm_dir(), layers=1)
    path, _ = export_text_model(encoder, tokenizer=tokenizer, path=work / "encoder.onnx", output_name="embedding")
    torch.manual_seed(0)
    classifier = TextClassifier(encoder, torch.nn.Linear(encoder.width, 5))
    head, _ = export_classifier(classifier, encoder_onnx=path, tokenizer=tokenizer, path=work / "classifier.onnx")
    return {"encoder": path, "classifier": head, "work": work}


def _hf_reference(texts: list[str], tokenizer) -> np.ndarray:
    """Embeddings as computed before round 8: BertModel's default (SDPA) attention with the 2-D mask it
    expands itself, its own position ids, and F.normalize."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False, local_files_only=True,
                                     attn_implementation="sdpa")
    bert.encoder.layer = bert.encoder.layer[:1]
    ids, mask = (torch.from_numpy(a) for a in tokenize(tokenizer, texts))
    with torch.no_grad():
        hidden = bert.eval()(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1).numpy()


def test_encoder_loads_with_eager_attention():
    assert load_encoder(minilm_dir(), layers=1).bert.config._attn_implementation == "eager"


@pytest.mark.parametrize("name", ["encoder", "classifier"])
def test_graph_has_no_sdpa_decomposition_and_symbolic_shapes_are_inferred(exported, name):
    model = onnx.load(str(exported[name]))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"IsNaN", "Where"}, ops
    del model.graph.value_info[:]  # as export.quantize.preprocess does
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
    (output,) = inferred.graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert dims[0] and dims[1] == (384 if name == "encoder" else 5), dims


@pytest.mark.parametrize("texts", [[PROBE_SENTENCES[1]], RAGGED], ids=["batch1", "ragged"])
def test_graph_matches_the_hugging_face_path(exported, tokenizer, texts):
    ids, mask = tokenize(tokenizer, texts)
    if len(texts) > 1:
        assert (mask == 0).any() and mask.all(axis=0).sum() < mask.shape[1]  # rows of different lengths
    got = ort_session(exported["encoder"]).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    expected = _hf_reference(texts, tokenizer)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.99999


@pytest.mark.parametrize("name", ["encoder", "classifier"])
def test_int8_preprocess_runs_symbolic_inference_and_quantizes(exported, tokenizer, name, caplog):
    src = exported[name]
    with caplog.at_level(logging.WARNING, logger="export.quantize"):
        pre = quantize.preprocess(src, exported["work"] / f"{name}-pre.onnx")
    assert not [r for r in caplog.records if "symbolic shape inference failed" in r.getMessage()]
    int8 = quantize.quantize_dynamic_model(pre, exported["work"] / f"{name}-int8.onnx",
                                           op_types=quantize.DYNAMIC_OPS, exclude=[])
    feed = dict(zip(("input_ids", "attention_mask"), tokenize(tokenizer, RAGGED)))
    kernels = kernel_counts(int8, feed)
    assert kernels.get("MatMulInteger", 0) + kernels.get("DynamicQuantizeMatMul", 0) > 0, kernels
    fp32 = ort_session(src).run(None, feed)[0]
    got = ort_session(int8).run(None, feed)[0]
    if name == "encoder":
        cosine = (got * fp32).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(fp32, axis=1)
        assert cosine.min() > 0.98
    else:
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, fp32, atol=0.05)
