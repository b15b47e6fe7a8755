"""The speech family's own held-out sets, scored for several zoos' speech models side by side (ONNX Runtime).

    python -m loadtests.speech_heldout --zoo /tmp/defzoo3 --zoo /tmp/r5speech [--profile default]

Recomposes the build's held-out clips exactly as models/speech.py does (held-out voices, seed 0) and its
held-out non-speech clips (models.speech_data.non_speech_set), then prints each model's accuracy, keyword-only
accuracy and share of non-speech clips answered with no keyword. A model trained before round 5 is scored on the
very clips its card was (the held-out composition did not change), so its card's figures reappear here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models import speech
from models import speech_data as sd


def scores(model: Path, *, clips: np.ndarray, labels: np.ndarray, non_speech: np.ndarray) -> dict[str, float]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {"waveform": x[i:i + 64]})[0] for i in range(0, len(x), 64)]).argmax(1)

    first_keyword = sd.LABELS.index(sd.KEYWORDS[0])
    pred, keyword = predict(clips), labels >= first_keyword
    return {"accuracy": float((pred == labels).mean()),
            "keyword_accuracy": float((pred[keyword] == labels[keyword]).mean()),
            "non_speech_no_keyword": float((predict(non_speech) < first_keyword).mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, action="append", required=True, help="a zoo holding speech/ (repeatable)")
    parser.add_argument("--profile", default="default", choices=sorted(speech.SYNTH))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus, aug = speech.load_corpus("synth", profile=args.profile, seed=args.seed, cache_dir=speech.default_cache_dir())
    clips, labels = speech.held_out(corpus, aug=aug, seed=args.seed)
    non_speech = speech.held_out_non_speech(corpus, seed=args.seed)
    print(f"load average {os.getloadavg()}; {len(labels)} held-out clips, {len(non_speech)} non-speech clips")
    for zoo in args.zoo:
        got = scores(zoo / "speech" / "1" / "model.onnx", clips=clips, labels=labels, non_speech=non_speech)
        print(f"{zoo!s:30s} " + "  ".join(f"{k} {v:.4f}" for k, v in got.items()), flush=True)


if __name__ == "__main__":
    main()
