"""The multi-turn rollout loop, driven by a scripted fake generator and a recording retriever.

The fake generator honours the Generator protocol (stop strings during sampling, keeping a whole
token that runs past one; EOS; per-call token budget) and logs every completion by the exact
context it was given, so a test can replay a trajectory: sampled tokens, then the encoded
inserted text, turn after turn, and compare with what the loop recorded.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import pytest

from searchrl.errors import ConfigError, SearchRLError
from searchrl.rewards import compute_reward
from searchrl.rollout.engine.protocol import Completion, GenerationStream, SamplingParams
from searchrl.rollout.config import RolloutConfig
from searchrl.rollout.engine.batch_stream import BatchStream
from searchrl.rollout.loop import RolloutStats, run_rollouts
from searchrl.rollout.observation import fit_information
from searchrl.rollout.prompts import INVALID_ACTION_FEEDBACK, LAST_TURN_NOTICE, build_prompt
from searchrl.types import Passage, QAExample

TAG_TOKENS = ["<search>", "</search>", "<answer>", "</answer>", "<think>", "</think>",
              "<information>", "</information>", "rch>ZZ", "Paris"]  # fmt: skip


def make_tokenizer():
    """A character-level BPE tokenizer whose tags (and a few odd pieces) are single tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    for ch in sorted(set(string.printable)):
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in TAG_TOKENS:
        for i in range(1, len(word)):
            if word[: i + 1] not in vocab:
                vocab[word[: i + 1]] = len(vocab)
                merges.append((word[:i], word[i]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


TOK = make_tokenizer()


class ScriptedGenerator:
    """Plays ``script(question, turn_index)``: a string (encoded) or a list of vocab tokens.

    The turn index is found from the contexts this generator already answered: a context that
    extends a logged ``context + completion`` is the next turn of that trajectory.
    """

    def __init__(self, tokenizer, script: Callable[[str, int], Any], questions: list[str]):
        self.tok, self.script, self.questions = tokenizer, script, questions
        self.calls: list[tuple[list[list[int]], SamplingParams, list[str]]] = []
        self.log: dict[tuple[int, ...], Completion] = {}
        self.states: dict[tuple[int, ...], int] = {}

    def _turn(self, context: list[int]) -> int:
        best, turn = -1, 0
        for state, t in self.states.items():
            if len(state) > best and tuple(context[: len(state)]) == state:
                best, turn = len(state), t + 1
        return turn

    def _question(self, context: list[int]) -> str:
        text = self.tok.decode(context)
        found = [q for q in self.questions if f"Question: {q}?" in text]
        assert len(found) == 1, text
        return found[0]

    def _tokens(self, question: str, turn: int) -> list[int]:
        step = self.script(question, turn)
        if isinstance(step, str):
            return self.tok.encode(step, add_special_tokens=False) + [self.tok.eos_token_id]
        ids = self.tok.convert_tokens_to_ids(step)
        assert self.tok.unk_token_id not in ids, step
        return ids + [self.tok.eos_token_id]

    def generate(self, prompts, sampling, stop=None):
        self.calls.append(([list(p) for p in prompts], sampling, list(stop or [])))
        return [self._complete(context, sampling.max_new_tokens, stop) for context in prompts]

    def _complete(self, context, max_new_tokens, stop) -> Completion:
        turn = self._turn(context)
        ids: list[int] = []
        finish, hit = "length", None
        for tid in self._tokens(self._question(context), turn):
            if len(ids) == max_new_tokens:
                break
            ids.append(tid)
            if tid == self.tok.eos_token_id:
                finish = "eos"
                break
            hits = [s for s in stop or [] if s in self.tok.decode(ids)]
            if hits:
                finish, hit = "stop", hits[0]
                break
        logprobs = [-0.01 * (turn * 1000 + j + 1) for j in range(len(ids))]
        c = Completion(ids, logprobs, finish, hit, self.tok.decode(ids))
        self.log[tuple(context)] = c
        self.states[tuple(context) + tuple(ids)] = turn
        return c


class ScriptedStreamingGenerator(ScriptedGenerator):
    """The same script as a continuous batch: a row added before step ``k`` with ``n`` scripted
    tokens finishes at step ``k + n - 1``. ``steps`` logs, per step, the keys in flight and the
    rows that finished."""

    can_stream = prefers_stream = True  # the "auto" schedule streams

    def __init__(self, *args):
        super().__init__(*args)
        self.steps: list[tuple[set, list]] = []
        self.adds: list[tuple[Any, int, int, int | None]] = []  # key, prompt length, budget, seed

    def stream(self, sampling, stop=None):
        gen = self
        self.calls.append(([], sampling, list(stop or [])))

        class Stream:
            def __init__(self):
                self.rows: dict[Any, list] = {}  # key -> [completion, tokens left]
                self.calls = 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.rows.clear()

            @property
            def busy(self):
                return bool(self.rows)

            def add(self, key, prompt, max_new_tokens, seed=None):
                assert key not in self.rows
                gen.adds.append((key, len(prompt), max_new_tokens, seed))
                c = gen._complete(list(prompt), max_new_tokens, stop)
                self.rows[key] = [c, max(1, len(c.token_ids))]

            def release(self, key):
                pass

            def step(self):
                self.calls += 1
                flight = set(self.rows)
                done = []
                for key in list(self.rows):
                    self.rows[key][1] -= 1
                    if self.rows[key][1] == 0:
                        done.append((key, self.rows.pop(key)[0]))
                gen.steps.append((flight, [k for k, _ in done]))
                return done

        return Stream()


class RecordingRetriever:
    """Returns ``k`` passages per query (ids ``query#j``) and records every call."""

    def __init__(self, text: Callable[[str, int], str] | None = None):
        self.calls: list[list[str]] = []
        self.text = text or (lambda q, j: f"Fact {j} about {q}.")

    def search(self, queries, k=3):
        self.calls.append(list(queries))
        return [
            [Passage(f"{q}#{j}", f"T{j}", self.text(q, j), 1.0 / (j + 1)) for j in range(k)]
            for q in queries
        ]


def examples(*questions: str) -> list[QAExample]:
    return [QAExample(str(i), q, [f"ans{i}"]) for i, q in enumerate(questions)]


def rollout(script, questions, cfg=None, retriever=None, streaming=False, **kw):
    exs = examples(*questions)
    kind = ScriptedStreamingGenerator if streaming else ScriptedGenerator
    gen = kind(TOK, script, list(questions))
    ret = retriever or RecordingRetriever()
    stats = RolloutStats()
    trajs = run_rollouts(exs, gen, ret, TOK, cfg or RolloutConfig(), stats=stats,
                         progress=False, **kw)  # fmt: skip
    return trajs, gen, ret, stats


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def replay(traj, gen: ScriptedGenerator) -> tuple[list[int], list[int], list[float]]:
    """Rebuild response ids / mask / log-probs from the generator's log and the turns' texts."""
    context, ids, mask, lps = list(traj.prompt_ids), [], [], []
    for turn in traj.turns:
        c = gen.log[tuple(context)]
        assert turn.text == c.text and turn.finish_reason == c.finish_reason
        obs = enc(turn.observation)
        ids += c.token_ids + obs
        mask += [1] * len(c.token_ids) + [0] * len(obs)
        lps += c.logprobs + [0.0] * len(obs)
        context += c.token_ids + obs
    return ids, mask, lps


def check_invariants(traj, gen, cfg: RolloutConfig):
    assert len(traj.response_ids) == len(traj.loss_mask) == len(traj.sampler_logprobs)
    assert (traj.response_ids, traj.loss_mask, traj.sampler_logprobs) == replay(traj, gen)
    assert traj.response_text == TOK.decode(traj.response_ids)
    assert len(traj.prompt_ids) + len(traj.response_ids) <= cfg.max_context_tokens
    assert traj.prompt_ids == build_prompt(TOK, traj.example.question)


def search_then_answer(q, turn):
    return f"<think>{q}?</think><search> {q} </search>" if turn == 0 else "<answer>Paris</answer>"


# ---- token accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_mask_zero_exactly_on_inserted_tokens(streaming):
    def script(q, turn):
        return [
            f"<think>look up {q}</think>\n<search> {q} facts </search>",
            "<think>" + "hmm " * 30,  # no action, cut by the per-turn budget
            "<answer> Paris </answer> trailing text never sampled",
        ][turn]

    cfg = RolloutConfig(max_new_tokens_per_turn=60, min_turn_tokens=8)
    trajs, gen, ret, stats = rollout(script, ["alpha", "beta"], cfg, n_samples=2, streaming=streaming)
    assert [(t.example.question, t.sample_index) for t in trajs] == [
        ("alpha", 0), ("alpha", 1), ("beta", 0), ("beta", 1)]  # fmt: skip
    for t in trajs:
        check_invariants(t, gen, cfg)
        assert [turn.action for turn in t.turns] == ["search", "invalid", "answer"]
        assert [turn.finish_reason for turn in t.turns] == ["stop", "length", "stop"]
        assert t.finish_reason == "answer" and t.answer == "Paris"
        assert t.turns[0].query == f"{t.example.question} facts"
        info = t.turns[0].observation
        assert info.startswith("\n\n<information>Doc 1(Title: T0) Fact 0 about ")
        assert info.endswith("</information>\n\n") and info.count("\nDoc ") == 2
        query = t.turns[0].query
        assert [p.id for p in t.turns[0].passages] == [f"{query}#{j}" for j in range(3)]
        assert t.turns[1].observation == INVALID_ACTION_FEEDBACK
        assert t.turns[2].observation == ""
        # the mask's zero runs are exactly the two inserted pieces, at their positions
        n0 = len(gen.log[tuple(t.prompt_ids)].token_ids)
        info_ids = enc(info)
        assert t.response_ids[n0 : n0 + len(info_ids)] == info_ids
        assert t.loss_mask[n0 : n0 + len(info_ids)] == [0] * len(info_ids)
        inserted = len(info_ids) + len(enc(INVALID_ACTION_FEEDBACK))
        assert sum(1 - m for m in t.loss_mask) == inserted
        assert t.response_ids[-1] == TOK.convert_tokens_to_ids("</answer>")
        assert t.num_searches == 1 and t.num_valid_actions == 2
        assert compute_reward(t, ["paris"]) == 1.0
    assert stats.generated_tokens == sum(sum(t.loss_mask) for t in trajs)
    assert stats.inserted_tokens == sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs)
    assert stats.trajectories == 4
    if streaming:  # the shorter question's turns end a step earlier: a retriever call each
        assert ret.calls == [["beta facts"] * 2, ["alpha facts"] * 2]
        assert stats.rounds == 6
    else:
        assert ret.calls == [["alpha facts", "alpha facts", "beta facts", "beta facts"]]
        assert stats.rounds == 3


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_string_mid_token_keeps_the_whole_token(streaming):
    tokens = ["<think>", "x", "</think>", "<search>", " ", "c", "a", "p", " ", "</sea", "rch>ZZ",
              "n", "o"]  # fmt: skip
    script = lambda q, turn: tokens if turn == 0 else "<answer>Paris</answer>"
    cfg = RolloutConfig()
    trajs, gen, _, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    first = t.turns[0]
    assert first.text.endswith("</search>ZZ") and first.finish_reason == "stop"
    assert first.action == "search" and first.query == "cap"
    sampled = TOK.convert_tokens_to_ids(tokens[:11])
    assert t.response_ids[: len(sampled)] == sampled  # exactly as sampled, straddling token kept
    assert t.loss_mask[: len(sampled)] == [1] * len(sampled)
    assert t.loss_mask[len(sampled)] == 0  # the information block starts right after it


@pytest.mark.parametrize("streaming", [False, True])
def test_sampled_eos_is_kept_and_trained(streaming):
    script = lambda q, turn: "<think>I give up</think>"  # ends with EOS, no action
    cfg = RolloutConfig()
    trajs, gen, _, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert t.finish_reason == "eos" and len(t.turns) == 1 and t.turns[0].action == "invalid"
    assert t.response_ids[-1] == TOK.eos_token_id and t.loss_mask[-1] == 1

    cfg = RolloutConfig(on_eos="feedback", max_turns=1)
    trajs, gen, _, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert t.finish_reason == "max_turns" and len(t.turns) == 2
    eos_pos = t.response_ids.index(TOK.eos_token_id)
    assert t.loss_mask[eos_pos] == 1 and t.loss_mask[eos_pos + 1] == 0  # feedback follows


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_actions_get_feedback_then_the_model_recovers(streaming):
    script = lambda q, turn: [
        "<think>a</think><search>  </search>",  # empty query
        "<think>b</think><answer>unclosed",  # EOS inside an open block: feedback too
    ][turn]
    cfg = RolloutConfig(on_eos="feedback")
    trajs, gen, _, _ = rollout(lambda q, t: script(q, t) if t < 2 else "<answer>x</answer>",
                               ["q"], cfg, streaming=streaming)  # fmt: skip
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert [x.action for x in t.turns] == ["invalid", "invalid", "answer"]
    assert [x.observation for x in t.turns[:2]] == [INVALID_ACTION_FEEDBACK] * 2
    assert t.finish_reason == "answer" and t.num_valid_actions == 1 and t.answer == "x"


# ---- turn budget --------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_search_on_last_turn_ends_unanswered_after_a_notice(streaming):
    script = lambda q, turn: f"<think>t{turn}</think><search> query {turn} </search>"
    cfg = RolloutConfig(max_turns=2)
    trajs, gen, ret, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert t.finish_reason == "search_on_last_turn" and len(t.turns) == 3
    assert [x.action for x in t.turns] == ["search", "search", "invalid"]
    assert t.turns[2].query == "query 2" and t.turns[2].observation == ""
    assert t.num_searches == 2 and ret.calls == [["query 0"], ["query 1"]]
    assert LAST_TURN_NOTICE not in t.turns[0].observation
    assert t.turns[1].observation.endswith(f"{LAST_TURN_NOTICE}\n</information>\n\n")
    assert t.answer is None and compute_reward(t, t.example) == 0.0


@pytest.mark.parametrize("streaming", [False, True])
def test_an_answer_split_by_a_length_cut_is_not_graded(streaming):
    # turn 1 "<answer> Par" is cut by the token budget, feedback follows, turn 2 writes
    # "is </answer>": what the model wrote reads "<answer> Paris </answer>" across the two turns
    script = lambda q, turn: ["<answer>", " ", "P", "a", "r"] if turn == 0 else "is </answer>"
    cfg = RolloutConfig(max_turns=1, max_new_tokens_per_turn=5, min_turn_tokens=4)
    trajs, gen, _, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert [turn.text for turn in t.turns] == ["<answer> Par", "is </answer>"]
    assert [turn.finish_reason for turn in t.turns] == ["length", "stop"]
    assert [turn.action for turn in t.turns] == ["invalid", "invalid"]
    assert t.finish_reason == "max_turns" and t.answer is None
    assert compute_reward(t, ["Paris"]) == 0.0


@pytest.mark.parametrize("streaming", [False, True])
def test_max_turns_with_only_invalid_actions(streaming):
    script = lambda q, turn: "<think>no idea</think>"
    cfg = RolloutConfig(max_turns=3, on_eos="feedback", last_turn_notice="")
    trajs, gen, _, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert t.finish_reason == "max_turns" and len(t.turns) == 4
    assert [x.observation for x in t.turns] == [INVALID_ACTION_FEEDBACK] * 3 + [""]
    cfg = RolloutConfig(max_turns=1, on_eos="feedback")
    t = rollout(script, ["q"], cfg, streaming=streaming)[0][0]
    assert t.turns[0].observation.rstrip().endswith(LAST_TURN_NOTICE)


# ---- token budgets ------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_per_turn_token_budget(streaming):
    long = "<think>" + "blah " * 40 + "</think><answer>x</answer>"
    cfg = RolloutConfig(max_new_tokens_per_turn=25, min_turn_tokens=4, max_turns=2,
                        last_turn_notice="")  # fmt: skip
    trajs, gen, _, _ = rollout(lambda q, t: long, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert all(len(gen.log[k].token_ids) <= 25 for k in gen.log)
    assert [x.finish_reason for x in t.turns] == ["length"] * 3
    assert all(s.max_new_tokens == 25 for _, s, _ in gen.calls)
    assert t.finish_reason == "max_turns"


@pytest.mark.parametrize("streaming", [False, True])
def test_observation_cut_at_passage_boundaries(streaming):
    text = lambda q, j: "word " * 10
    one_doc = len(enc(f"\n\n<information>Doc 1(Title: T0) {text('', 0)}\n</information>\n\n"))
    two_docs = one_doc + len(enc(f"Doc 2(Title: T1) {text('', 1)}\n"))
    cfg = RolloutConfig(max_obs_tokens=two_docs + 5, last_turn_notice="")
    trajs, gen, _, _ = rollout(search_then_answer, ["q"], cfg, RecordingRetriever(text), streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    obs = t.turns[0].observation
    assert "Doc 2(Title: T1)" in obs and "Doc 3" not in obs
    assert obs.endswith("\n</information>\n\n") and len(enc(obs)) <= cfg.max_obs_tokens
    assert len(t.turns[0].passages) == 3  # all retrieved passages are recorded


@pytest.mark.parametrize("streaming", [False, True])
def test_observation_cuts_a_too_long_first_passage_at_a_token_boundary(streaming):
    text = lambda q, j: "abcdefghij" * 30
    cfg = RolloutConfig(max_obs_tokens=120, last_turn_notice="")
    trajs, gen, _, _ = rollout(search_then_answer, ["q"], cfg, RecordingRetriever(text), streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    obs = t.turns[0].observation
    ids = enc(obs)
    assert obs.endswith("\n</information>\n\n") and "Doc 2" not in obs
    assert 110 <= len(ids) <= 120  # as much of the passage as fits
    body = obs[len("\n\n<information>Doc 1(Title: T0) ") : -len("\n</information>\n\n")]
    assert body and text("", 0).startswith(body)
    # the function itself, with a notice that must survive
    got = fit_information(TOK, [Passage("1", "T", "xyz " * 100)], 80, note="Answer now.")
    assert got is not None and len(got[1]) <= 80
    assert got[0].endswith("Answer now.\n</information>\n\n")
    assert fit_information(TOK, [Passage("1", "T", "x")], 5) is None


def test_tiny_max_obs_tokens_is_a_config_error():
    cfg = RolloutConfig(max_obs_tokens=5)
    with pytest.raises(ConfigError, match="max_obs_tokens"):
        rollout(search_then_answer, ["q"], cfg)


@pytest.mark.parametrize("streaming", [False, True])
def test_context_budget_ends_with_context_and_keeps_the_prompt(streaming):
    script = lambda q, turn: f"<think>step {turn}</think><search> q{turn} </search>"
    prompt_len = len(build_prompt(TOK, "q"))
    cfg = RolloutConfig(max_context_tokens=prompt_len + 300, max_turns=10, min_turn_tokens=8,
                        max_new_tokens_per_turn=60)  # fmt: skip
    trajs, gen, ret, _ = rollout(script, ["q"], cfg, streaming=streaming)
    t = trajs[0]
    check_invariants(t, gen, cfg)
    assert t.finish_reason == "context" and 1 < len(t.turns) < 10
    # every call asked for no more tokens than the context had room for
    for prompts, sampling, _ in gen.calls:
        assert all(len(p) + sampling.max_new_tokens <= cfg.max_context_tokens for p in prompts)
    if streaming:
        assert len(gen.adds) == len(t.turns)
        assert all(n + budget <= cfg.max_context_tokens for _, n, budget, _ in gen.adds)

    # a prompt that does not fit at all ends at once, untouched
    long_q = "why " * 200
    cfg = RolloutConfig(max_context_tokens=300, min_turn_tokens=8, max_new_tokens_per_turn=50)
    trajs, gen, _, _ = rollout(script, [long_q.strip()], cfg, streaming=streaming)
    t = trajs[0]
    assert t.finish_reason == "context" and t.turns == [] and t.response_ids == []
    assert t.prompt_ids == build_prompt(TOK, long_q) and gen.log == {}


@pytest.mark.parametrize("streaming", [False, True])
def test_rows_near_the_context_limit_get_a_smaller_budget(streaming):
    short, long_q = "a", "b" * 80
    prompt_len = len(build_prompt(TOK, long_q))
    cfg = RolloutConfig(max_context_tokens=prompt_len + 30, max_new_tokens_per_turn=50,
                        min_turn_tokens=8)  # fmt: skip
    script = lambda q, turn: "<answer>x</answer>"
    trajs, gen, _, stats = rollout(script, [short, long_q], cfg, streaming=streaming)
    assert [t.finish_reason for t in trajs] == ["answer", "answer"]
    if streaming:  # one stream, a budget per row
        assert sorted(budget for _, _, budget, _ in gen.adds) == [30, 50]
        assert stats.generator_calls == len(gen.steps)
    else:  # a generate call per budget
        assert sorted(s.max_new_tokens for _, s, _ in gen.calls) == [30, 50]
        assert stats.rounds == 1 and stats.generator_calls == 2


# ---- scheduling ---------------------------------------------------------------------------


def test_one_batched_retriever_call_per_round():
    plan = {"a": 3, "b": 1, "c": 2, "d": 0}  # searches before answering

    def script(q, turn):
        if turn < plan[q]:
            return f"<think>.</think><search> {q}{turn} </search>"
        return "<answer>z</answer>"

    trajs, gen, ret, stats = rollout(script, list(plan), RolloutConfig(), batch_size=4)
    assert ret.calls == [["a0", "b0", "c0"], ["a1", "c1"], ["a2"]]
    assert len(gen.calls) == stats.rounds == 4
    assert [t.num_searches for t in trajs] == [3, 1, 2, 0]
    assert [len(prompts) for prompts, _, _ in gen.calls] == [4, 3, 2, 1]


def test_refill_starts_pending_work_before_the_slow_trajectory_finishes():
    def script(q, turn):
        if q == "slow" and turn < 3:
            return f"<think>.</think><search> s{turn} </search>"
        return "<answer>done</answer>"

    qs = ["fast", "slow", "third", "fourth"]
    trajs, gen, ret, stats = rollout(script, qs, RolloutConfig(), batch_size=2)
    prompts = {q: build_prompt(TOK, q) for q in qs}
    fresh = [[q for q in qs if prompts[q] in p] for p, _, _ in gen.calls]
    assert fresh == [["fast", "slow"], ["third"], ["fourth"], []]
    # round 2 served the slow trajectory (its second turn) next to a brand-new one
    slow_row = gen.calls[1][0][0]
    assert len(gen.calls[1][0]) == 2 and slow_row[: len(prompts["slow"])] == prompts["slow"]
    assert all(len(p) <= 2 for p, _, _ in gen.calls)
    slow = trajs[1]
    assert slow.example.question == "slow" and len(slow.turns) == 4
    assert [t.example.question for t in trajs] == qs  # output order is example order
    assert stats.rounds == 4


def test_continuous_schedule_batches_the_queries_of_a_step_and_refills_at_once():
    plan = {"a": 3, "b": 1, "c": 2, "d": 0, "e": 0, "f": 1}  # searches before answering

    def script(q, turn):
        if turn < plan[q]:
            return f"<think>{q}</think><search> {q}{turn} </search>"  # the same length for all
        return "<answer>z</answer>"

    trajs, gen, ret, stats = rollout(script, list(plan), RolloutConfig(), streaming=True, batch_size=4)
    assert [t.num_searches for t in trajs] == [3, 1, 2, 0, 0, 1]
    assert max(len(flight) for flight, _ in gen.steps) == 4  # never more than batch_size in flight
    # the turns that end at one step share one retriever call, in key order
    ended = [[k for k in done if trajs[k[0]].turns] for _, done in gen.steps]
    assert ret.calls[0] == ["a0", "b0", "c0"] and len(ret.calls) == stats.retriever_calls
    # "d" answers at once: its slot goes to "e" right away, while a, b, c are mid-trajectory
    keys = [(i, 0) for i in range(6)]
    first_e = next(i for i, (flight, _) in enumerate(gen.steps) if keys[4] in flight)
    assert {keys[0], keys[1], keys[2]} <= gen.steps[first_e][0]
    assert keys[3] in gen.steps[first_e - 1][1]  # "d" finished the step before
    assert stats.generator_calls == len(gen.steps) and any(ended)
    # seeds: one per (example, sample, turn), all different, reproducible from cfg.seed
    _, gen2, _, _ = rollout(script, list(plan), RolloutConfig(seed=5), streaming=True, batch_size=4)
    _, gen3, _, _ = rollout(script, list(plan), RolloutConfig(seed=5), streaming=True, batch_size=2)
    seeds = {(k, n): seed for (k, _, _, seed), n in zip(gen2.adds, range(len(gen2.adds)))}
    assert len(set(seeds.values())) == len(seeds) == sum(plan.values()) + len(plan)
    assert sorted(x[3] for x in gen2.adds) == sorted(x[3] for x in gen3.adds)
    assert all(seed is None for *_, seed in gen.adds)  # no cfg.seed: the generator draws


def test_auto_schedule_streams_only_where_the_generator_prefers_it():
    def steps(gen_cls, schedule, prefers=True):
        gen = gen_cls(TOK, search_then_answer, ["q"])
        gen.prefers_stream = prefers
        run_rollouts(examples("q"), gen, RecordingRetriever(), TOK, RolloutConfig(schedule=schedule),
                     progress=False)  # fmt: skip
        return getattr(gen, "steps", None), [len(p) for p, _, _ in gen.calls]

    assert steps(ScriptedStreamingGenerator, "auto")[0]  # streamed
    assert steps(ScriptedStreamingGenerator, "auto", prefers=False) == ([], [1, 1])  # two rounds
    assert steps(ScriptedStreamingGenerator, "rounds") == ([], [1, 1])
    assert steps(ScriptedStreamingGenerator, "continuous", prefers=False)[0]
    assert steps(ScriptedGenerator, "auto") == (None, [1, 1])


def test_batch_stream_runs_rounds_behind_the_stream_protocol():
    gen = ScriptedGenerator(TOK, lambda q, turn: "<answer>x</answer>", ["a", "b", "c"])
    stream = BatchStream(gen, SamplingParams(50, seed=3), ["</answer>"])
    assert isinstance(stream, GenerationStream)
    prompts = {q: build_prompt(TOK, q) for q in "abc"}
    with stream:
        stream.add("kc", prompts["c"], 2)
        stream.add("ka", prompts["a"], 50, seed=99)  # a batch call takes one seed per call
        stream.add("kb", prompts["b"], 2)
        with pytest.raises(SearchRLError, match="already queued"):
            stream.add("ka", prompts["a"], 50)
        assert stream.busy
        done = stream.step()
        assert not stream.busy and stream.step() == []
    assert [k for k, _ in done] == ["kc", "ka", "kb"]  # the order they were added
    assert [c.text for _, c in done] == ["<answer>x", "<answer>x</answer>", "<answer>x"]
    # one generate call per budget, largest first, seeded seed + call index
    assert [(len(p), s.max_new_tokens, s.seed) for p, s, _ in gen.calls] == [(1, 50, 3), (2, 2, 4)]
    assert stream.calls == 2


def test_seed_advances_per_call_and_sampling_is_passed_on():
    cfg = RolloutConfig(seed=7, temperature=0.7, top_p=0.9)
    _, gen, _, _ = rollout(search_then_answer, ["q"], cfg)
    assert [s.seed for _, s, _ in gen.calls] == [7, 8]
    assert {(s.temperature, s.top_p) for _, s, _ in gen.calls} == {(0.7, 0.9)}
    assert all(stop == ["</search>", "</answer>"] for _, _, stop in gen.calls)


# ---- baselines ----------------------------------------------------------------------------


def test_single_turn_methods():
    script = lambda q, turn: "<think>x</think><answer>Paris</answer>"
    for method in ("direct", "cot"):
        exs = examples("q1", "q2")
        gen = ScriptedGenerator(TOK, script, ["q1", "q2"])
        trajs = run_rollouts(exs, gen, None, TOK, method=method, progress=False)
        assert [t.finish_reason for t in trajs] == ["answer", "answer"]
        assert gen.calls[0][2] == ["</answer>"] and len(gen.calls) == 1
        assert trajs[0].prompt_ids == build_prompt(TOK, "q1", method)

    exs = examples("q1", "q2")
    gen = ScriptedGenerator(TOK, lambda q, t: "<search> more </search>", ["q1", "q2"])
    ret = RecordingRetriever()
    trajs = run_rollouts(exs, gen, ret, TOK, method="rag", progress=False)
    assert ret.calls == [["q1", "q2"]]  # one batched retrieval for all questions
    assert "Doc 1(Title: T0) Fact 0 about q1." in TOK.decode(trajs[0].prompt_ids)
    # no </search> stop here: the search block is just text, the row runs to EOS unanswered
    assert [t.finish_reason for t in trajs] == ["eos"] * 2
    assert trajs[0].turns[0].action == "invalid" and len(trajs[0].turns[0].passages) == 3


def test_config_errors_name_the_field():
    for kwargs, field in [
        (dict(max_turns=-1), "max_turns"),
        (dict(topk=0), "topk"),
        (dict(max_new_tokens_per_turn=0), "max_new_tokens_per_turn"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(stop=[]), "stop"),
        (dict(on_eos="ignore"), "on_eos"),
        (dict(min_turn_tokens=600), "min_turn_tokens"),
        (dict(feedback="try <answer>x</answer>"), "feedback"),
    ]:
        with pytest.raises(ConfigError, match=f"rollout.{field}"):
            RolloutConfig(**kwargs)
    with pytest.raises(ConfigError, match="method"):
        run_rollouts([], None, None, TOK, method="react")
    with pytest.raises(ConfigError, match="retriever"):
        run_rollouts([], None, None, TOK, method="search")


# ---- prompts ------------------------------------------------------------------------------


def test_build_prompt_plain_and_chat_template():
    from searchrl.rollout.prompts import prompt_text

    plain = build_prompt(TOK, "who wrote hamlet")
    assert plain == TOK.encode(prompt_text("who wrote hamlet"), add_special_tokens=True)
    text = TOK.decode(plain)
    assert text.endswith("Question: who wrote hamlet?\n")
    tags = ("<think>", "<search> query </search>", "<information>", "<answer> Beijing </answer>")
    assert all(tag in text for tag in tags)
    chat = make_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    ids = build_prompt(chat, "who wrote hamlet?")
    assert chat.decode(ids) == f"User: {prompt_text('who wrote hamlet')}\nAssistant:"
    direct = TOK.decode(build_prompt(TOK, "q", "direct"))
    assert "<search>" not in direct and "<answer>" in direct
    assert "<think>" in TOK.decode(build_prompt(TOK, "q", "cot"))
    with pytest.raises(ConfigError, match="rag"):
        build_prompt(TOK, "q", "rag")
    with pytest.raises(ConfigError, match="unknown prompt method"):
        build_prompt(TOK, "q", "tree-of-thought")


# ---- end to end with a real (tiny, random) model --------------------------------------------


def _steered(torch, lm, bigrams: dict[int, int], strength: float = 30.0):
    """Wrap ``lm`` so that each token in ``bigrams`` makes its successor very likely."""

    class Steered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.config, self.generation_config = lm, lm.config, lm.generation_config
            vocab = lm.get_input_embeddings().num_embeddings
            table = torch.zeros(vocab, vocab)  # (V, V): bias on the next token's logits
            for a, b in bigrams.items():
                table[a, b] = strength
            self.register_buffer("table", table)

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

        def forward(self, input_ids, logits_to_keep=0, **kw):
            out = self.lm(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)
            k = out.logits.shape[1]
            out.logits = out.logits + self.table[input_ids[:, -k:]]  # (b, k, V)
            return out

    return Steered().eval()


def _check_hf_trajectory(torch, t, tok, model):
    assert len(t.response_ids) == len(t.loss_mask) == len(t.sampler_logprobs)
    assert t.prompt_ids == build_prompt(tok, t.example.question)
    assert t.finish_reason in ("answer", "search_on_last_turn", "max_turns", "eos", "context")
    # response = per turn: the sampled run (mask 1), then the encoded inserted text (mask 0)
    pos = 0
    for turn in t.turns:
        n = 0
        while pos + n < len(t.loss_mask) and t.loss_mask[pos + n] == 1:
            n += 1
        assert tok.decode(t.response_ids[pos : pos + n], skip_special_tokens=True) == turn.text
        obs = tok.encode(turn.observation, add_special_tokens=False)
        assert t.response_ids[pos + n : pos + n + len(obs)] == obs
        assert t.loss_mask[pos + n : pos + n + len(obs)] == [0] * len(obs)
        pos += n + len(obs)
    assert pos == len(t.response_ids)
    # the recorded log-probs are the model's own, token by token (temperature 1)
    ids = torch.tensor([t.prompt_ids + t.response_ids])  # (1, L)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]  # (L, V)
    start = len(t.prompt_ids)
    want = logp[start - 1 : -1].gather(-1, ids[0, start:, None]).squeeze(-1)  # (R,)
    got = torch.tensor(t.sampler_logprobs)
    mask = torch.tensor(t.loss_mask, dtype=torch.bool)
    assert torch.allclose(got[mask], want[mask], atol=1e-4)
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("schedule", ["continuous", "rounds"])
def test_end_to_end_with_tiny_random_model(schedule):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("searchrl.rollout.engine.hf")
    testing = pytest.importorskip("searchrl.testing")

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    lm = testing.tiny_random_lm(tok, seed=0)
    cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=12, min_turn_tokens=4, seed=0,
                        on_eos="feedback", max_context_tokens=1200, schedule=schedule)  # fmt: skip
    exs = examples("alpha", "beta", "gamma")

    # a purely random model: no valid actions, feedback after every turn
    stats = RolloutStats()
    trajs = run_rollouts(exs, hf.HFGenerator(lm, tok), RecordingRetriever(), tok, cfg,
                         n_samples=2, batch_size=4, stats=stats, progress=False)  # fmt: skip
    assert [(t.example.id, t.sample_index) for t in trajs] == [
        (str(i), s) for i in range(3) for s in range(2)]  # fmt: skip
    for t in trajs:
        _check_hf_trajectory(torch, t, tok, lm)
    assert stats.generated_tokens == sum(sum(t.loss_mask) for t in trajs) > 0

    # the same model steered to search once, then answer: real stop strings, real retrieval
    ids = {t: tok.convert_tokens_to_ids(t) for t in (":", "<search>", "x", "</search>", "\n",
                                                       "<answer>", "y", "</answer>")}  # fmt: skip
    chain = [(":", "<search>"), ("<search>", "x"), ("x", "</search>"), ("\n", "<answer>"),
             ("<answer>", "y"), ("y", "</answer>")]  # fmt: skip
    steered = _steered(torch, lm, {ids[a]: ids[b] for a, b in chain})
    ret = RecordingRetriever()
    trajs = run_rollouts(exs, hf.HFGenerator(steered, tok), ret, tok, cfg, n_samples=2,
                         batch_size=4, progress=False)  # fmt: skip
    assert [t.finish_reason for t in trajs] == ["answer"] * 6
    assert ret.calls == [["x"] * 4, ["x"] * 2]  # 4 rows at once, then the 2 admitted later
    for t in trajs:
        _check_hf_trajectory(torch, t, tok, steered)
        assert [turn.action for turn in t.turns] == ["search", "answer"]
        assert t.turns[0].text == "<search>x</search>" and t.answer == "y"


def test_trajectory_keeps_its_token_invariant():
    from searchrl.types import Trajectory, Turn

    t = Trajectory(example=examples("q")[0], prompt_ids=[1, 2])
    t.turns.append(Turn("<search> x </search>", "search", query="x"))
    t.add_sampled([5, 6, 7], [-0.5, -0.25, -1.0])
    t.add_inserted([8, 9], "<information>d</information>")
    assert t.response_ids == [5, 6, 7, 8, 9] and t.loss_mask == [1, 1, 1, 0, 0]
    assert t.sampler_logprobs == [-0.5, -0.25, -1.0, 0.0, 0.0]
    assert t.turns[-1].observation == "<information>d</information>"
    with pytest.raises(ValueError, match="3 sampled tokens but 2 log-probs"):
        t.add_sampled([1, 2, 3], [-0.1, -0.2])
    assert len(t.response_ids) == len(t.loss_mask) == len(t.sampler_logprobs) == 5
    assert t.to_dict(with_tokens=True)["sampler_logprobs"] == t.sampler_logprobs
