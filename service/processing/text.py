"""Text (transformer family): texts -> embeddings, plus labels where the model is a classifier.

Tokenised with the model's own tokenizer.json (`tokenizers`), truncated as that tokenizer does at the
config's max_sequence_length; each request's texts are padded to one length so the dynamic batcher can stack
them with other requests of that length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

from service.errors import InvalidInput, ModelLoadError, PayloadTooLarge
from service.processing.base import Limits, parse_k, setting, top_k_rows

ACCEPTS = "JSON {\"texts\": [\"non-empty string\", ...]}"


# C0 and C1 control characters other than tab/newline/return, and DEL: BERT's normalizer deletes them, which
# glued the words on either side of a form feed or vertical tab (PDF page and line breaks) into one.
_CONTROLS = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"


def with_user_text_normalization(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with two steps before its own normalizer, for text as users type and paste it.

    Unicode NFKC, so compatibility forms read as the plain characters the vocabulary holds: full-width Latin from
    a CJK keyboard ("Ｏｐｅｎ ａ ｆｉｌｅ"), ligatures copied from PDFs ("ﬁle"), superscripts; and control
    characters as spaces, since none of them belongs inside a word. Before round 6 those were [UNK], split into
    other words, or joined to the next word. Texts already in NFKC without control characters (ASCII prose among
    them) keep their tokens.
    """
    # NOTE: prepended to the tokenizer's own normalizer (the Rust pipeline), so offsets and truncation stay the
    # tokenizer's and no Python pass over each text is added; tokenizer.json on disk stays the model's.
    steps = [normalizers.NFKC(), normalizers.Replace(Regex(_CONTROLS), " ")]
    own = tokenizer.normalizer
    tokenizer.normalizer = normalizers.Sequence(steps + ([own] if own is not None else []))
    return tokenizer


@dataclass
class PreparedText:
    ids: list[int]
    truncated: bool
    tokens: int  # tokens the text had before truncation (with special tokens)


class TextProcessor:
    def __init__(self, *, tokenizer_path: Path, max_length: int, input_names: list[str],
                 output_name: str, labels: list[str] | None, vocab_size: int | None = None,
                 limits: Limits | None = None) -> None:
        self.tokenizer = with_user_text_normalization(Tokenizer.from_file(str(tokenizer_path)))
        self.tokenizer.no_padding()  # we pad per request in collate
        # Truncation keeps the cut-off tokens in `overflowing` (stride 0: no token twice), so one encode both
        # truncates and counts the text's full length.
        self.tokenizer.enable_truncation(max_length, stride=0)
        self.max_length = max_length
        self.limits = limits or Limits()
        if vocab_size is not None and self.tokenizer.get_vocab_size() > vocab_size:
            # A token id past the model's embedding table would fail inside ONNX Runtime on some texts only.
            raise ModelLoadError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens but the model's "
                                 f"vocab_size is {vocab_size}; expected a tokenizer that fits the model")
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.input_names, self.output_name, self.labels = input_names, output_name, labels
        self.task = "text-classification" if labels else "text-embedding"

    def describe(self) -> dict:
        doc: dict[str, object] = {"accepts": ACCEPTS,
               "preprocessing": f"tokenizer.json, truncated at {self.max_length} tokens (reported per text as "
                                "truncated/tokens); a request's texts padded to its longest; Unicode NFKC and control "
                                "characters as spaces first"}
        if self.labels:
            doc["params"] = {"k": "number of labels returned (default 3)"}
        return doc

    def admit(self, payloads: Sequence[Any]) -> None:
        """Texts are bounded one by one (max_text_bytes) and by the request's body limit."""

    def prepare(self, payload: Any, *, index: int) -> PreparedText:
        if not isinstance(payload, str):
            raise InvalidInput(f"text {index}: expected a string, got {type(payload).__name__}")
        limit = self.limits.max_text_bytes
        # len(str) <= its UTF-8 length <= 4 * len(str): encode only when the character count cannot decide.
        if len(payload) > limit or (4 * len(payload) > limit and len(payload.encode("utf-8", "surrogatepass")) > limit):
            raise PayloadTooLarge(f"text {index} is longer than {limit} UTF-8 bytes; the model reads only its first "
                                  f"{self.max_length} tokens, send at most {limit} bytes ({setting('max_text_bytes')})")
        if not payload.strip():
            raise InvalidInput(f"text {index} is empty; expected non-empty text")
        try:
            enc = self.tokenizer.encode(payload)
        except TypeError:  # a lone surrogate ("\ud800" in JSON) is no UTF-8 text: the tokenizer refuses it
            if any("\ud800" <= c <= "\udfff" for c in payload):
                raise InvalidInput(f"text {index} holds a lone UTF-16 surrogate (an emoji cut in half?); expected "
                                   "valid Unicode text") from None
            raise
        if all(enc.special_tokens_mask):  # only characters the tokenizer drops: NUL, control, zero-width, accents
            raise InvalidInput(f"text {index} has no tokens: the tokenizer drops all of its characters (control, "
                               "NUL, zero-width or lone combining characters); expected non-empty text")
        # Each overflowing piece is post-processed like the first (special tokens added again): count only its
        # ordinary tokens.
        extra = sum(len(o.ids) - sum(o.special_tokens_mask) for o in enc.overflowing)
        return PreparedText(list(enc.ids), bool(enc.overflowing), len(enc.ids) + extra)

    def rows_per_run(self, prepared: Sequence[Any]) -> int | None:
        """Runs of at most max_batch_tokens tokens: the model's memory grows with rows x length (x length for
        attention), and 64 texts at full length took over 1 GB in one run."""
        longest = max(len(p.ids) for p in prepared)
        return max(1, self.limits.max_batch_tokens // longest)

    def collate(self, prepared: list[PreparedText]) -> dict[str, np.ndarray]:
        length = max(len(p.ids) for p in prepared)
        ids = np.full((len(prepared), length), self.pad_id, np.int64)
        mask = np.zeros((len(prepared), length), np.int64)
        for row, p in enumerate(prepared):
            ids[row, :len(p.ids)] = p.ids
            mask[row, :len(p.ids)] = 1
        return {self.input_names[0]: ids, self.input_names[1]: mask}

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[PreparedText], *,
                    params: dict) -> list[dict]:
        data = outputs[self.output_name]
        k = parse_k(params.get("k"), default=3, limit=len(self.labels)) if self.labels else 0
        # One top-k (or tolist) over the batch: per-row numpy scalars were the cost of this step.
        per_row = top_k_rows(data[:len(prepared)], labels=self.labels, k=k) if self.labels \
            else data[:len(prepared)].astype(np.float64).tolist()
        results = []
        for p, out in zip(prepared, per_row):
            item: dict[str, Any] = {"tokens": p.tokens, "tokens_used": len(p.ids), "truncated": p.truncated}
            item["predictions" if self.labels else "embedding"] = out
            results.append(item)
        return results
