"""transformer family: the published graphs load in ONNX Runtime, keep dynamic batch and sequence axes,
match PyTorch and sentence-transformers, come with a usable tokenizer, and are served by the real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models import transformer
from models import transformer_corpus as tc
from models.common import ort_session
from models.transformer_text import PROBE_SENTENCES, load_encoder, load_tokenizer, minilm_dir, tokenize
from service.modelrepo.card import CARD_KEYS
from service.modelrepo.config import parse_config_text as parse_config

MODELS = (transformer.NAME, transformer.CLASSIFIER_NAME)
LONG_TEXT = " ".join(PROBE_SENTENCES)  # about 200 tokens


@pytest.fixture(scope="session")
def text_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny zoo where it exists, else this family alone built at the tiny profile."""
    try:
        return Path(request.getfixturevalue("tiny_zoo"))
    except pytest.FixtureLookupError:
        repo = tmp_path_factory.mktemp("transformer") / "models"
        transformer.build(profile="tiny", repo_dir=repo)
        return repo


@pytest.fixture(scope="module")
def tokenizer(text_repo: Path):
    """The tokenizer as published next to the model (what a server would use)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(text_repo / transformer.NAME / "tokenizer.json"))


def _card(repo: Path, name: str) -> dict:
    return json.loads((repo / name / "metrics.json").read_text())


def _run(repo: Path, name: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort_session(repo / name / "1" / "model.onnx")
    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("name", MODELS)
def test_repository_layout(text_repo: Path, name: str) -> None:
    folder = text_repo / name
    config = parse_config((folder / "config.pbtxt").read_text())
    card = _card(text_repo, name)
    assert config.name == name and (folder / "1" / "model.onnx").is_file() and (folder / "tokenizer.json").is_file()
    assert [i.name for i in config.input] == ["input_ids", "attention_mask"]
    assert set(CARD_KEYS) <= set(card) and card["family"] == "transformer"
    if name == transformer.CLASSIFIER_NAME:
        labels = (folder / "labels.txt").read_text().splitlines()
        assert labels == card["labels"] == list(tc.CHAPTERS)
        assert list(config.output[0].dims) == [len(labels)]
        assert 0.0 <= card["metrics"]["accuracy"] <= 1.0


def test_published_tokenizer_pads_to_longest_and_truncates(tokenizer) -> None:
    ids, mask = tokenize(tokenizer, ["Thanks!", LONG_TEXT * 3])
    assert ids.shape == mask.shape == (2, 256)  # truncated at sentence-transformers' max_seq_length
    assert ids[0, 0] == tokenizer.token_to_id("[CLS]") and mask[0].sum() < 10 and mask[1].all()
    assert (ids[0][mask[0] == 0] == tokenizer.token_to_id("[PAD]")).all()
    same, _ = tokenize(load_tokenizer(minilm_dir()), ["Thanks!", LONG_TEXT * 3])
    np.testing.assert_array_equal(ids, same)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_dynamic_batch_and_sequence_axes(text_repo: Path, tokenizer, name: str, batch: int) -> None:
    lengths = set()
    for text in ("A short one.", LONG_TEXT):
        ids, mask = tokenize(tokenizer, [text] * batch)
        out = _run(text_repo, name, ids, mask)
        lengths.add(ids.shape[1])
        assert out.dtype == np.float32 and out.shape[0] == batch and np.isfinite(out).all()
        if name == transformer.NAME:
            assert out.shape[1] == 384
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        else:
            assert ((out >= 0) & (out <= 1)).all()
            np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert len(lengths) == 2


def test_embeddings_match_pytorch(text_repo: Path, tokenizer) -> None:
    import torch

    layers = int(_card(text_repo, transformer.NAME)["input_spec"]["encoder_layers"].split()[0])
    encoder = load_encoder(minilm_dir(), layers=layers)
    ids, mask = tokenize(tokenizer, list(PROBE_SENTENCES))
    with torch.no_grad():
        expected = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(_run(text_repo, transformer.NAME, ids, mask), expected, atol=2e-5)


def test_padding_does_not_change_an_embedding(text_repo: Path, tokenizer) -> None:
    texts = list(PROBE_SENTENCES[:5])
    ids, mask = tokenize(tokenizer, texts)
    batched = _run(text_repo, transformer.NAME, ids, mask)
    assert (mask == 0).any()
    for row, text in enumerate(texts):
        alone = _run(text_repo, transformer.NAME, *tokenize(tokenizer, [text]))
        np.testing.assert_allclose(batched[row], alone[0], atol=2e-5)


def test_classifier_probabilities_depend_on_the_text(text_repo: Path, tokenizer) -> None:
    """One probability per label in labels.txt, and they vary between texts (the head is no constant)."""
    labels = (text_repo / transformer.CLASSIFIER_NAME / "labels.txt").read_text().splitlines()
    probs = _run(text_repo, transformer.CLASSIFIER_NAME, *tokenize(tokenizer, list(PROBE_SENTENCES)))
    assert probs.shape == (len(PROBE_SENTENCES), len(labels))
    assert np.ptp(probs, axis=0).max() > 1e-3


def test_full_minilm_matches_sentence_transformers() -> None:
    """The untruncated PyTorch encoder and tokenizer that the default profile exports reproduce
    sentence-transformers' embeddings (the exported graph matches this module: the parity tests)."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = [*PROBE_SENTENCES, LONG_TEXT * 2]  # the last one is truncated at 256 tokens
    reference = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    expected = reference.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    ids, mask = tokenize(load_tokenizer(minilm_dir()), texts)
    with torch.no_grad():
        got = load_encoder(minilm_dir())(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    cosine = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_corpus_is_labelled_and_splits_keep_groups_apart() -> None:
    corpus = tc.load_corpus()
    counts = np.bincount(corpus.labels, minlength=len(tc.CHAPTERS))
    assert corpus.class_names == list(tc.CHAPTERS) and counts.min() >= 50
    assert len(set(corpus.texts)) == len(corpus)
    assert all(tc.MIN_WORDS <= len(t.split()) for t in corpus.texts)
    for by in ("owners", "modules"):
        train, test = tc.grouped_split(corpus, by=by, folds=5, seed=0)
        groups = getattr(corpus, by)
        assert not set(groups[train]) & set(groups[test])
        assert set(corpus.labels[test]) == set(range(len(tc.CHAPTERS)))
    small = tc.sample_per_class(corpus, per_class=7, seed=0)
    assert np.bincount(small.labels).tolist() == [7] * len(tc.CHAPTERS)


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    tok = load_tokenizer(minilm_dir())
    with pytest.raises(ValueError, match="non-empty sequence of strings"):
        tokenize(tok, "not a list")
    with pytest.raises(ValueError, match="non-empty sequence of strings"):
        tokenize(tok, [])
    with pytest.raises(ValueError, match=r"expected 1\.\.6"):
        load_encoder(minilm_dir(), layers=7)
    with pytest.raises(ValueError, match="unknown profile"):
        transformer.build(profile="huge", repo_dir=tmp_path)
    with pytest.raises(ValueError, match="'owners' or 'modules'"):
        tc.grouped_split(tc.load_corpus(), by="labels", folds=5, seed=0)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        transformer.main(["--help"])
    assert exit_info.value.code == 0 and "--profile" in capsys.readouterr().out


def test_served_models_answer_tritonclient(text_repo: Path, tokenizer, tmp_path: Path, serve_repository) -> None:
    import tritonclient.http as httpclient

    repo = tmp_path / "models"
    for name in MODELS:
        shutil.copytree(text_repo / name, repo / name)
    ids, mask = tokenize(tokenizer, list(PROBE_SENTENCES[:3]))
    with serve_repository(repo) as url:
        client = httpclient.InferenceServerClient(url)
        for name, output in zip(MODELS, ("embedding", "probabilities")):
            inputs = [httpclient.InferInput("input_ids", list(ids.shape), "INT64"),
                      httpclient.InferInput("attention_mask", list(mask.shape), "INT64")]
            inputs[0].set_data_from_numpy(ids)
            inputs[1].set_data_from_numpy(mask)
            result = client.infer(name, inputs, outputs=[httpclient.InferRequestedOutput(output)])
            np.testing.assert_allclose(result.as_numpy(output), _run(repo, name, ids, mask), atol=1e-5)
