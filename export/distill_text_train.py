"""Training pieces of the sentence-encoder student: layer mapping, narrower FFN, teacher cache, losses, loop.

Recipe (after TinyBERT, Jiao et al. 2020, and MiniLM, Wang et al. 2020, the teacher's own recipe):

* **Layer mapping.** Student layer j is a copy of teacher layer ``init_layers[j]`` (default: evenly
  spaced including the first and the last: [0, 2, 5] for three of six). Each student layer is trained to
  output what the teacher's layer *before the next copied one* outputs (``StudentPlan.hidden_targets``:
  [1, 4, 5] for [0, 2, 5]), i.e. the input the next student layer's weights were trained to read; the last
  student layer matches the teacher's last layer.
* **Narrower FFN.** Optionally each student FFN keeps only its ``ffn`` most important neurons, importance
  being |input weights| x |output weights| of the neuron (magnitude pruning, then recovered by training).
* **Losses.** 1 - cosine of the sentence embeddings (the served output), 1 - cosine of every real
  token's last hidden state (a far richer signal per text than one 384-d vector), 1 - cosine of the
  intermediate hidden states at the mapped layers, and MiniLM's last-layer self-attention transfer:
  KL(teacher || student) of each head's attention distribution, averaged over real query tokens.
  Optionally (weight ``neighbours``) the neighbour structure top-k retrieval scores: for each text, KL between
  the teacher's and the student's softmax over cosine similarity to a bank of other texts' teacher embeddings
  (the last NEIGHBOUR_BANK seen), as in relational / contrastive distillation (Park et al. 2019, Tian et al. 2020).
* **Teacher cache.** The teacher's targets (embedding, mapped hidden states, last-layer attention; fp16
  but the embedding) are computed once per fixed batch into files under a cache folder and reused by
  every epoch and every rerun; the training checkpoints itself every few minutes and resumes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.transformer_text import SentenceEncoder, mean_pool, tokenize

CHECKPOINT_SECONDS = 300.0
NEIGHBOUR_BANK = 4096  # teacher embeddings of recent batches each text's neighbours are ranked among
NEIGHBOUR_TEMPERATURE = 0.05  # sharp: cosines to the nearest texts (0.6-0.9) dominate, as top-k does
LOG_EVERY = 100  # steps between loss lines in the log (the curve behind BENCHMARKS' extrapolation)
log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # its loss lines go to distill_text's log file (distill_text.chatter_to)


@dataclass(frozen=True)
class StudentPlan:
    """Which teacher layers the student copies, and its FFN width (None: the teacher's)."""

    init_layers: tuple[int, ...]
    ffn: int | None = None

    def hidden_targets(self, total: int) -> tuple[int, ...]:
        """Teacher layer whose output each student layer learns to reproduce (see module doc)."""
        return (*(nxt - 1 for nxt in self.init_layers[1:]), total - 1)


def spread(total: int, *, keep: int) -> tuple[int, ...]:
    """``keep`` evenly spaced layers of ``total``, always the first and the last."""
    return tuple(sorted({int(np.rint(i)) for i in np.linspace(0, total - 1, keep)}))


def _sliced(linear: nn.Linear, keep: torch.Tensor, *, rows: bool) -> nn.Linear:
    weight = linear.weight.data[keep] if rows else linear.weight.data[:, keep]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data[keep] if rows else linear.bias.data)
    return out


def narrow_ffn(layer: Any, *, width: int) -> torch.Tensor:
    """Keep the ``width`` FFN neurons of a BERT layer with the largest |w_in| * |w_out|; their indices."""
    up, down = layer.intermediate.dense, layer.output.dense
    if not 1 <= width <= up.out_features:
        raise ValueError(f"ffn width {width}: expected 1..{up.out_features}")
    score = up.weight.data.norm(dim=1) * down.weight.data.norm(dim=0)
    keep = torch.sort(torch.topk(score, width).indices).values
    layer.intermediate.dense = _sliced(up, keep, rows=True)
    layer.output.dense = _sliced(down, keep, rows=False)
    return keep


def check_plan(plan: StudentPlan, *, total: int) -> None:
    """Fail unless ``plan`` copies increasing, distinct layers of a ``total``-layer teacher."""
    if not plan.init_layers or any(not 0 <= i < total for i in plan.init_layers) or \
            list(plan.init_layers) != sorted(set(plan.init_layers)):
        raise ValueError(f"init_layers {plan.init_layers}: expected increasing layer indices in 0..{total - 1}")


def make_student(teacher: SentenceEncoder, plan: StudentPlan) -> SentenceEncoder:
    """Cut ``teacher`` (in place: pass a fresh copy) down to ``plan``'s layers and FFN width."""
    check_plan(plan, total=len(teacher.bert.encoder.layer))
    bert = teacher.bert
    bert.encoder.layer = nn.ModuleList([bert.encoder.layer[i] for i in plan.init_layers])
    bert.config.num_hidden_layers = len(plan.init_layers)
    if plan.ffn:
        for layer in bert.encoder.layer:
            narrow_ffn(layer, width=plan.ffn)
        bert.config.intermediate_size = plan.ffn
    teacher.layers = len(plan.init_layers)
    return teacher


def internals(encoder: SentenceEncoder, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Embedding, every layer's output (``hidden[i]`` = layer i) and the last layer's attention."""
    out = encoder.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                       output_hidden_states=True, output_attentions=True)
    return {"embedding": F.normalize(mean_pool(out.last_hidden_state, mask), p=2.0, dim=1),
            "hidden": out.hidden_states[1:], "attention": out.attentions[-1]}


def token_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of 1 - cosine(student token state, teacher token state)."""
    cos = F.cosine_similarity(student, teacher.to(student.dtype), dim=-1)
    real = mask.to(student.dtype)
    return ((1.0 - cos) * real).sum() / real.sum().clamp(min=1.0)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of ``[batch, heads, query, key]`` attention rows, mean over heads and real queries."""
    teacher = teacher.to(student.dtype)
    kl = (torch.xlogy(teacher, teacher) - teacher * torch.log(student.clamp(min=1e-12))).sum(-1)
    real = mask.to(student.dtype)[:, None, :].expand_as(kl)
    return (kl * real).sum() / real.sum().clamp(min=1.0)


def neighbour_kl(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, *,
                 temperature: float = NEIGHBOUR_TEMPERATURE) -> torch.Tensor:
    """KL(teacher || student) of each text's softmax over cosine similarities to ``bank`` (unit rows)."""
    target = F.log_softmax(teacher @ bank.T / temperature, dim=-1)
    return F.kl_div(F.log_softmax(student @ bank.T / temperature, dim=-1), target, log_target=True,
                    reduction="batchmean")


class NeighbourBank:
    """The teacher embeddings of the last ``size`` texts trained on (first in, first out)."""

    def __init__(self, size: int = NEIGHBOUR_BANK) -> None:
        self.size = size
        self.rows: torch.Tensor | None = None

    def add(self, embeddings: torch.Tensor) -> None:
        rows = embeddings.detach().float()
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])[-self.size:]


def distil_losses(student: dict[str, Any], teacher: dict[str, Any], mask: torch.Tensor, *,
                  targets: Sequence[int], weights: dict[str, float],
                  bank: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms (module doc) and ``total``, their weighted sum; ``teacher['hidden']`` maps
    teacher layer -> hidden state, ``targets[j]`` is the teacher layer student layer j learns; ``bank``: other
    texts' teacher embeddings for the neighbour term (only with a ``neighbours`` weight)."""
    last = len(targets) - 1
    terms = {
        "embedding": (1.0 - F.cosine_similarity(student["embedding"], teacher["embedding"], dim=-1)).mean(),
        "tokens": token_cosine_loss(student["hidden"][last], teacher["hidden"][targets[last]], mask),
        "attention": attention_kl(student["attention"], teacher["attention"], mask),
    }
    if last:
        terms["hidden"] = torch.stack([token_cosine_loss(student["hidden"][j], teacher["hidden"][targets[j]], mask)
                                       for j in range(last)]).mean()
    if weights.get("neighbours") and bank is not None:
        terms["neighbours"] = neighbour_kl(student["embedding"], teacher["embedding"], bank)
    terms["total"] = sum(weights.get(name, 0.0) * value for name, value in terms.items())  # type: ignore[assignment]
    return terms


def length_batches(texts: Sequence[str], *, batch_size: int) -> list[np.ndarray]:
    """Fixed batches of similar lengths (less padding); an epoch shuffles their order only."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def total_steps(settings: dict[str, Any], batches: int) -> int:
    """Training steps for ``settings['epochs']`` (may be fractional: the last epoch is cut short) epochs."""
    return max(1, round(settings["epochs"] * batches))


def cache_key(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class TeacherCache:
    """Per-batch teacher targets in ``folder`` (one file per fixed batch), computed on first use."""

    def __init__(self, folder: Path, *, layers: Sequence[int]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.layers = tuple(sorted(set(layers)))

    def path(self, index: int) -> Path:
        return self.folder / f"batch-{index:06d}.pt"

    def missing(self, count: int) -> list[int]:
        return [i for i in range(count) if not self.path(i).exists()]

    @torch.no_grad()
    def fill(self, teacher: SentenceEncoder, *, tokenizer: Any, texts: Sequence[str],
             batches: Sequence[np.ndarray], progress: Any = None) -> None:
        # NOTE: shuffled so that the progress bar's rate (and ETA) is representative: batches are length-sorted.
        todo = self.missing(len(batches))
        for index in np.random.default_rng(len(batches)).permutation(todo) if todo else ():
            ids, mask = (torch.from_numpy(a) for a in tokenize(tokenizer, [texts[i] for i in batches[int(index)]]))
            out = internals(teacher, ids, mask)
            _atomic_save({"embedding": out["embedding"], "attention": out["attention"].half(),
                          "hidden": {i: out["hidden"][i].half() for i in self.layers}}, self.path(int(index)))
            if progress is not None:
                progress(1)

    def load(self, index: int) -> dict[str, Any]:
        return torch.load(self.path(index), weights_only=True)


WARMUP = 0.06  # fraction of the budget spent warming the learning rate up (as OneCycleLR's pct_start did)


def lr_factor(progress: float, *, warmup: float = WARMUP) -> float:
    """Learning-rate multiplier at ``progress`` (0..1) through the budget: linear warm-up from 1/25, then a
    cosine down to 0 at 1, so the last steps anneal whether the budget is counted in steps or in minutes.

    NOTE: hand-written rather than a torch scheduler: those are indexed by step, and a time-budgeted run
    does not know its step count up front.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return 0.04 + 0.96 * progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: where training stands."""

    step: int = 0
    losses: dict[str, float] | None = None  # running sums of the current epoch's loss terms
    count: int = 0  # steps in those sums
    seconds: float = 0.0  # training time spent so far (``settings['minutes']`` counts it across resumes)


@dataclass
class Budget:
    """How far training is: the larger of its fraction of ``steps`` and of ``minutes`` (if set) spent."""

    steps: int
    minutes: float | None = None

    def progress(self, *, step: int, seconds: float) -> float:
        by_time = seconds / (60.0 * self.minutes) if self.minutes else 0.0
        return max(step / self.steps, by_time)


def train(student: SentenceEncoder, *, cache: TeacherCache, tokenizer: Any, texts: Sequence[str],
          batches: Sequence[np.ndarray], targets: Sequence[int], settings: dict[str, Any], seed: int,
          checkpoint: Path, progress: Any = None, clock: Callable[[], float] = time.monotonic) -> dict[str, float]:
    """Distil ``student`` for ``settings['epochs']`` epochs (may be fractional) over the cached batches, or until
    ``settings['minutes']`` of training time are spent if that comes first; the learning rate follows
    ``lr_factor`` over that budget. Resumes from ``checkpoint`` (written every CHECKPOINT_SECONDS) when it was
    written for the same key. Returns the last epoch's mean losses and the steps and epochs trained."""
    student.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # shared with the teacher: see distill_text
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.01)
    budget = Budget(steps=total_steps(settings, len(batches)), minutes=settings.get("minutes"))
    key = cache_key(settings, seed, len(batches), targets)
    state = _resume(checkpoint, key=key, student=student, opt=opt)
    bank = NeighbourBank() if settings["weights"].get("neighbours") else None
    if progress is not None and state.step:
        progress(state.step)
    student.train()
    last_save = began = clock()
    while (done := budget.progress(step=state.step, seconds=state.seconds + clock() - began)) < 1.0:
        for group in opt.param_groups:
            group["lr"] = settings["lr"] * lr_factor(done)
        terms = _epoch_step(student, opt=opt, state=state, cache=cache, tokenizer=tokenizer, texts=texts,
                            batches=batches, targets=targets, settings=settings, seed=seed, bank=bank)
        if progress is not None:
            progress(1, postfix=f"loss {terms['total']:.4f} emb {terms['embedding']:.4f}")
        if state.step % LOG_EVERY == 0:
            log.info("step %d, %.0f s, lr %.2e, epoch means %s", state.step, state.seconds + clock() - began,
                     opt.param_groups[0]["lr"], {k: round(v / state.count, 4) for k, v in (state.losses or {}).items()})
        if clock() - last_save > CHECKPOINT_SECONDS:
            _save(checkpoint, key=key, student=student, opt=opt, state=state, seconds=state.seconds + clock() - began)
            last_save = clock()
    _save(checkpoint, key=key, student=student, opt=opt, state=state, seconds=state.seconds + clock() - began)
    student.eval()
    sums, count = state.losses or {}, state.count
    return {**{f"final_{name}_loss": value / max(count, 1) for name, value in sums.items()},
            "steps_trained": float(state.step), "epochs_trained": round(state.step / len(batches), 3)}


def _epoch_step(student: SentenceEncoder, *, opt: torch.optim.Optimizer, state: TrainState, cache: TeacherCache,
                tokenizer: Any, texts: Sequence[str], batches: Sequence[np.ndarray], targets: Sequence[int],
                settings: dict[str, Any], seed: int, bank: NeighbourBank | None = None) -> dict[str, float]:
    """One step on the batch that ``state.step`` points at (each epoch shuffles the batch order); updates the
    epoch's running loss sums in ``state``, and adds the batch's teacher embeddings to ``bank``."""
    epoch, position = divmod(state.step, len(batches))
    if position == 0:
        state.losses, state.count = {}, 0
    index = int(np.random.default_rng([seed, epoch]).permutation(len(batches))[position])
    teacher = cache.load(index)
    terms = _step(student, opt=opt, teacher=teacher, tokenizer=tokenizer, texts=[texts[i] for i in batches[index]],
                  targets=targets, weights=settings["weights"], bank=None if bank is None else bank.rows)
    if bank is not None:
        bank.add(teacher["embedding"])
    sums = state.losses if state.losses is not None else {}
    for name, value in terms.items():
        sums[name] = sums.get(name, 0.0) + value
    state.losses, state.count, state.step = sums, state.count + 1, state.step + 1
    return terms


def _save(path: Path, *, key: str, student: nn.Module, opt: torch.optim.Optimizer, state: TrainState,
          seconds: float) -> None:
    _atomic_save({"key": key, "step": state.step, "model": student.state_dict(), "opt": opt.state_dict(),
                  "losses": state.losses, "count": state.count, "seconds": seconds}, path)


def _step(student: SentenceEncoder, *, opt: torch.optim.Optimizer, teacher: dict[str, Any], tokenizer: Any,
          texts: list[str], targets: Sequence[int], weights: dict[str, float],
          bank: torch.Tensor | None = None) -> dict[str, float]:
    ids, mask = (torch.from_numpy(a) for a in tokenize(tokenizer, texts))
    terms = distil_losses(internals(student, ids, mask), teacher, mask, targets=targets, weights=weights, bank=bank)
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt.step()
    return {name: float(value.item()) for name, value in terms.items()}


def _resume(path: Path, *, key: str, student: nn.Module, opt: torch.optim.Optimizer) -> TrainState:
    if not path.exists():
        return TrainState()
    saved = torch.load(path, weights_only=False)
    if saved.get("key") != key:
        return TrainState()  # another configuration's checkpoint: start over
    student.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    return TrainState(step=int(saved["step"]), losses=saved.get("losses"), count=int(saved.get("count", 0)),
                      seconds=float(saved.get("seconds", 0.0)))
