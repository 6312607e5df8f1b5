"""Supervised stages on the same machinery as RL: format warm-start, SFT, rejection sampling.

- ``demonstrations``: synthetic search trajectories for questions whose hop chain is known (the
  synthetic world's ``extra["hops"]``). A scripted generator plays the model's turns (think,
  search each hop's query, answer) inside the real rollout loop, so demonstrations carry exactly
  the prompt, inserted ``<information>`` blocks and loss mask that RL will see. This is the short
  cold start that teaches a small model the tags (as DeepSeek-R1's cold start does).
- ``sft_train``: next-token loss on ``loss_mask == 1`` tokens of any trajectories.
- ``rejection_sampling_data``: sample trajectories with the current policy and keep the correct
  ones (the paper's rejection-sampling baseline = ``sft_train`` on them).

Left out: packing several demonstrations per row.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from tqdm.auto import tqdm

from searchrl.rewards import exact_match
from searchrl.rollout.engine.protocol import Completion, SamplingParams
from searchrl.rollout.loop import RolloutConfig, run_rollouts
from searchrl.training.batch import collate, micro_batches, response_logprobs
from searchrl.types import QAExample, Trajectory

log = logging.getLogger(__name__)

_RELATION_WORDS = {
    "born_in": "where {e} was born", "located_in": "which country {e} is in", "author": "who wrote {e}",
    "founded_by": "who founded {e}", "founded_year": "when {e} was founded", "employer": "where {e} works",
    "capital": "the capital of {e}", "headquartered_in": "where {e} is based", "director": "who directed {e}",
    "spouse": "who {e} is married to", "performer": "who recorded {e}", "release_year": "when {e} came out",
    "publisher": "who published {e}", "studio": "which studio made {e}", "birth_year": "when {e} was born",
    "label": "which label released {e}",
}


def need_phrase(relation: str, entity: str) -> str:
    """What a demonstration's thought says it must find: ``need_phrase("author", "X")`` = "who wrote X"."""
    return _RELATION_WORDS.get(relation, "the " + relation.replace("_", " ") + " of {e}").format(e=entity)


DEMO_STYLES = ("plan", "stepwise")
LR_SCHEDULES = ("constant", "linear")


def demo_turns(example: QAExample, style: str = "plan") -> list[str] | None:
    """The model's turns of a demonstration for ``example`` (None without a hop chain).

    ``style="plan"``: the first thought states the whole plan (what each hop looks up, and how
    many searches that takes), so after each ``<information>`` block the choice between searching
    again and answering can be read off the model's own earlier words: a small model learns that
    far more easily than inferring the remaining hops from the question anew at every turn.

    >>> ex = QAExample("q", "Who employs the spouse of Ana Bel?", ["Acme"], extra={"hops": [
    ...     {"entity": "Ana Bel", "relation": "spouse", "answer": "Cy Dee", "query": "Ana Bel married"},
    ...     {"entity": "Cy Dee", "relation": "employer", "answer": "Acme", "query": "Cy Dee employer"}]})
    >>> for turn in demo_turns(ex): print(turn)
    <think> I need to find who Ana Bel is married to, then where the result works. That takes 2 searches. </think>
    <search> Ana Bel married </search>
    <think> The passage says Cy Dee. Search 2 of 2: I need to find where Cy Dee works. </think>
    <search> Cy Dee employer </search>
    <think> The passage says Acme. That was the last search, so the answer is Acme. </think>
    <answer> Acme </answer>

    ``style="stepwise"``: no count up front; after each ``<information>`` block the thought says
    whether the question is answered, and if not, what is still missing (the decision is taken
    where the evidence is, one observation at a time):

    >>> for turn in demo_turns(ex, "stepwise"): print(turn)
    <think> I need to find who Ana Bel is married to. </think>
    <search> Ana Bel married </search>
    <think> The passage says Cy Dee. The question asks where Cy Dee works, so I search again. </think>
    <search> Cy Dee employer </search>
    <think> The passage says Acme, which answers the question. </think>
    <answer> Acme </answer>
    """
    hops = example.extra.get("hops") if example.extra else None
    if not hops:
        return None
    if example.extra.get("compare"):
        return _comparison_turns(hops, example.extra["compare"], example.golden_answers[0], style)
    if style == "stepwise":
        return _stepwise_turns(hops)
    n = len(hops)
    plan = ", then ".join(need_phrase(h["relation"], hops[0]["entity"] if i == 0 else "the result")
                          for i, h in enumerate(hops))
    takes = "That takes 1 search." if n == 1 else f"That takes {n} searches."
    turns = [f"<think> I need to find {plan}. {takes} </think>\n<search> {hops[0]['query']} </search>"]
    for i in range(1, n):
        need = need_phrase(hops[i]["relation"], hops[i]["entity"])
        turns.append(f"<think> The passage says {hops[i - 1]['answer']}. Search {i + 1} of {n}: I need to find "
                     f"{need}. </think>\n<search> {hops[i]['query']} </search>")
    answer = hops[-1]["answer"]
    turns.append(f"<think> The passage says {answer}. That was the last search, so the answer is {answer}. "
                 f"</think>\n<answer> {answer} </answer>")
    return turns


def _stepwise_turns(hops: list[dict]) -> list[str]:
    turns = [f"<think> I need to find {need_phrase(hops[0]['relation'], hops[0]['entity'])}. </think>\n"
             f"<search> {hops[0]['query']} </search>"]
    for i in range(1, len(hops)):
        turns.append(f"<think> The passage says {hops[i - 1]['answer']}. The question asks "
                     f"{need_phrase(hops[i]['relation'], hops[i]['entity'])}, so I search again. </think>\n"
                     f"<search> {hops[i]['query']} </search>")
    answer = hops[-1]["answer"]
    turns.append(f"<think> The passage says {answer}, which answers the question. </think>\n<answer> {answer} </answer>")
    return turns


def _comparison_turns(hops: list[dict], kind: str, answer: str, style: str) -> list[str]:
    """A comparison's demonstration (see :mod:`searchrl.data.world_comparisons`): one search per
    entity, then the two values compared.

    >>> hop = lambda e, a: {"entity": e, "relation": "release_year", "answer": a, "query": f"{e} released"}
    >>> for turn in _comparison_turns([hop("Dawn", "1990"), hop("Dusk", "1975")], "earlier", "Dusk", "plan"):
    ...     print(turn)
    <think> I need to find when Dawn came out and when Dusk came out, then compare them. That takes 2 searches. </think>
    <search> Dawn released </search>
    <think> The passage says 1990. Search 2 of 2: I need to find when Dusk came out. </think>
    <search> Dusk released </search>
    <think> The passage says 1975. 1975 is earlier than 1990, so the answer is Dusk. </think>
    <answer> Dusk </answer>
    """
    a, b = hops
    need_a, need_b = need_phrase(a["relation"], a["entity"]), need_phrase(b["relation"], b["entity"])
    va, vb = a["answer"], b["answer"]
    if kind == "same":
        verdict = f"Both are {va}" if va == vb else f"{va} and {vb} are different"
    else:
        first, second = (va, vb) if (answer == a["entity"]) else (vb, va)
        verdict = f"{first} is {'earlier' if kind == 'earlier' else 'later'} than {second}"
    if style == "stepwise":
        turns = [f"<think> I need to find {need_a}. </think>\n<search> {a['query']} </search>",
                 f"<think> The passage says {va}. The question also asks {need_b}, so I search again. </think>\n"
                 f"<search> {b['query']} </search>"]
    else:
        turns = [f"<think> I need to find {need_a} and {need_b}, then compare them. That takes 2 searches. </think>\n"
                 f"<search> {a['query']} </search>",
                 f"<think> The passage says {va}. Search 2 of 2: I need to find {need_b}. </think>\n"
                 f"<search> {b['query']} </search>"]
    turns.append(f"<think> The passage says {vb}. {verdict}, so the answer is {answer}. </think>\n"
                 f"<answer> {answer} </answer>")
    return turns


class ScriptedGenerator:
    """A Generator that replays fixed turn texts, keyed by the prompt each context starts with."""

    def __init__(self, tokenizer: Any, scripts: dict[tuple[int, ...], list[str]]):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.calls: dict[tuple[int, ...], int] = {}
        self.prompt_lens = sorted({len(k) for k in scripts})

    def _key(self, context: list[int]) -> tuple[int, ...]:
        for n in self.prompt_lens:
            key = tuple(context[:n])
            if key in self.scripts:
                return key
        raise KeyError("context does not start with a scripted prompt")

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, stop=None) -> list[Completion]:
        out = []
        for ctx in prompts:
            key = self._key(ctx)
            i = self.calls.get(key, 0)
            self.calls[key] = i + 1
            script = self.scripts[key]
            text = script[min(i, len(script) - 1)]
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))[: sampling.max_new_tokens]
            out.append(Completion(ids, [0.0] * len(ids), "stop", stop_string=None, text=text))
        return out


def demonstrations(examples: list[QAExample], tokenizer: Any, retriever: Any, cfg: RolloutConfig,
                   limit: int, seed: int = 0, method: str = "search", style: str = "plan") -> list[Trajectory]:
    """Up to ``limit`` scripted demonstration trajectories that end with the gold answer
    (``style``: the thoughts' wording, see :func:`demo_turns`)."""
    from searchrl.rollout.prompts import build_prompt

    pool = [e for e in examples if demo_turns(e)]
    random.Random(seed).shuffle(pool)
    scripts: dict[tuple[int, ...], list[str]] = {}
    chosen = []
    for e in pool:
        key = tuple(build_prompt(tokenizer, e.question, method))
        if key in scripts:
            continue
        scripts[key] = demo_turns(e, style)  # type: ignore[assignment]
        chosen.append(e)
        if len(chosen) >= limit:
            break
    gen = ScriptedGenerator(tokenizer, scripts)
    trajs = run_rollouts(chosen, gen, retriever, tokenizer, cfg, n_samples=1, batch_size=64,
                         method=method, progress=False)
    good = [t for t in trajs if t.finish_reason == "answer" and exact_match(t.answer, t.example.golden_answers)]
    log.info("demonstrations: %d of %d scripted trajectories are complete", len(good), len(trajs))
    return good


def demonstrations_by_hops(examples: list[QAExample], tokenizer: Any, retriever: Any, cfg: RolloutConfig, limit: int,
                           multi_hop_share: float | None, seed: int = 0, method: str = "search",
                           style: str = "plan") -> list[Trajectory]:
    """:func:`demonstrations` drawn by hop count: ``round(limit * multi_hop_share)`` of them from
    questions of more than one hop, the rest from 1-hop ones (fewer where a kind runs short or a
    script does not end with its gold answer); ``None``: drawn as the questions come."""
    if multi_hop_share is None:
        return demonstrations(examples, tokenizer, retriever, cfg, limit=limit, seed=seed, method=method, style=style)
    n_multi = round(limit * multi_hop_share)
    single = [e for e in examples if len(e.extra.get("hops") or ()) == 1]
    multi = [e for e in examples if len(e.extra.get("hops") or ()) > 1]
    out: list[Trajectory] = []
    for pool, n in ((single, limit - n_multi), (multi, n_multi)):
        if n:
            out += demonstrations(pool, tokenizer, retriever, cfg, limit=n, seed=seed, method=method, style=style)
    return out


def sft_loss(model: torch.nn.Module, trajs: list[Trajectory], pad_id: int, device: torch.device,
             normalizer: float) -> torch.Tensor:
    """Summed next-token NLL over sampled (mask 1) response tokens, divided by ``normalizer``."""
    b = collate(trajs, pad_id).to(device)
    logp, _ = response_logprobs(model, b, mask=b.loss_mask)  # [B, R]; the LM head on loss tokens only
    return -(logp * b.loss_mask).sum() / normalizer


def sft_train(model: torch.nn.Module, tokenizer: Any, trajs: list[Trajectory], steps: int,
              batch_size: int, lr: float, micro_batch_size: int = 8, seed: int = 0,
              grad_clip: float = 1.0, progress: bool = True, amp: torch.dtype | None = None,
              schedule: str = "constant", average_last: int = 0) -> list[float]:
    """``steps`` AdamW steps of SFT over ``trajs`` (cycled in seeded order); returns the losses.

    ``amp``: autocast dtype for the forward passes (see :func:`searchrl.models.amp_dtype`).
    ``schedule``: ``constant`` keeps ``lr``; ``linear`` decays it to 0 over the steps (step k of
    n runs at ``lr * (n - k) / n``), so the last few small batches weigh less in the final weights.
    ``average_last``: the model ends with the mean of its weights after each of the last
    ``average_last`` steps (tail averaging: the final weights no longer depend on which few
    demonstrations happened to come last; 0 or 1 = the last step's weights)."""
    from searchrl.models import amp_context

    if not trajs:
        raise ValueError("no trajectories to train on")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule: one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    opt = torch.optim.AdamW(params, lr=lr)
    factor = (lambda k: (steps - k) / max(steps, 1)) if schedule == "linear" else (lambda k: 1.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    averaged: list[torch.Tensor] = []
    first_averaged = max(steps - average_last, 0) if average_last > 1 else steps  # steps = none
    model.train()
    for k in tqdm(range(steps), desc="warm-start SFT", disable=not progress):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(trajs)))
                rng.shuffle(order)
            batch.append(trajs[order.pop()])
        total = float(sum(sum(t.loss_mask) for t in batch)) or 1.0
        loss_sum = 0.0
        for mb in micro_batches(batch, micro_batch_size):
            with amp_context(amp, device):
                loss = sft_loss(model, mb, pad_id, device, total)
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        decay.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        if k == first_averaged:
            averaged = [p.detach().clone() for p in params]
        elif k > first_averaged:  # running mean over steps first_averaged..k
            with torch.no_grad():
                for a, p in zip(averaged, params):
                    a.add_(p.detach() - a, alpha=1.0 / (k - first_averaged + 1))
    if averaged:
        with torch.no_grad():
            for a, p in zip(averaged, params):
                p.copy_(a)
    return losses


def answer_sft_data(examples: list[QAExample], tokenizer: Any, method: str = "direct") -> list[Trajectory]:
    """The paper's SFT baseline data: the prompt, then ``<answer> gold </answer>`` (no search)."""
    from searchrl.models import eos_token_ids
    from searchrl.rollout.prompts import build_prompt

    eos = eos_token_ids(tokenizer)[:1]
    out = []
    for e in examples:
        ids = list(tokenizer.encode(f"<answer> {e.golden_answers[0]} </answer>", add_special_tokens=False)) + eos
        out.append(Trajectory(e, build_prompt(tokenizer, e.question, method), ids, [1] * len(ids),
                              [0.0] * len(ids), finish_reason="answer",
                              response_text=tokenizer.decode(ids)))
    return out


def rejection_sampling_data(examples: list[QAExample], generator: Any, retriever: Any, tokenizer: Any,
                            cfg: RolloutConfig, n_samples: int, batch_size: int = 32) -> list[Trajectory]:
    """Sample ``n_samples`` trajectories per question; keep one correct one per question."""
    trajs = run_rollouts(examples, generator, retriever, tokenizer, cfg, n_samples=n_samples,
                         batch_size=batch_size, progress=True)
    kept: dict[str, Trajectory] = {}
    for t in trajs:
        if t.example.id not in kept and exact_match(t.answer, t.example.golden_answers):
            kept[t.example.id] = t
    log.info("rejection sampling: kept %d of %d questions", len(kept), len(examples))
    return list(kept.values())
