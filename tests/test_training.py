"""Trainer tests on a tiny random model: updates, accumulation invariance, masks, config errors."""

from __future__ import annotations

import copy

import pytest
import torch

from searchrl.config import apply_overrides, load_yaml_config
from searchrl.errors import ConfigError
from searchrl.training.batch import collate, response_logprobs
from searchrl.training.config import TrainConfig
from searchrl.training.models import build_models
from searchrl.training.trainer import DataSampler, Trainer
from searchrl.types import Passage, QAExample, Trajectory, Turn


class EchoRetriever:
    def search(self, queries, k=3):
        return [[Passage(str(i), f"T{i}", f"about {q}", 1.0 / (i + 1)) for i in range(k)] for q in queries]


def make_trajs(tokenizer, n: int, group: int, seed: int = 0) -> list[Trajectory]:
    """Hand-made trajectories: random sampled tokens with an inserted (mask 0) block in the middle."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ex = QAExample(f"q{i // group}", f"question {i // group}", ["x"])
        prompt = tokenizer.encode(f"Question {i // group}?", add_special_tokens=False)
        a = torch.randint(100, 1000, (3 + i % 3,), generator=g).tolist()
        ins = tokenizer.encode("\n<information>doc</information>\n", add_special_tokens=False)
        b = torch.randint(100, 1000, (2 + i % 2,), generator=g).tolist()
        out.append(Trajectory(ex, prompt, a + ins + b, [1] * len(a) + [0] * len(ins) + [1] * len(b),
                              [0.0] * (len(a) + len(ins) + len(b)), sample_index=i % group))
    return out


def make_trainer(tiny_lm, tmp_path, *overrides: str) -> Trainer:
    model, tok = tiny_lm
    cfg = apply_overrides(TrainConfig(), [f"out={tmp_path / 'run'}", "prompts_per_step=2", "algo.group_size=2",
                                          "mini_batch_size=4", "micro_batch_size=4", "optim.lr=1e-2",
                                          "rollout.max_new_tokens_per_turn=16", "rollout.max_turns=1", *overrides])
    bundle = build_models(cfg.model, need_reference=cfg.algo.kl_coef > 0, need_critic=cfg.algo.needs_critic,
                          model=model, tokenizer=tok)
    examples = [QAExample(f"e{i}", f"What is item {i}", [f"a{i}"]) for i in range(4)]
    return Trainer(cfg, bundle, EchoRetriever(), examples)


def surrogate(tr: Trainer, trajs, prep) -> float:
    """The policy loss of the current weights on a fixed batch (old log-probs from ``prep``)."""
    from searchrl.algos.losses import policy_loss

    b = collate(trajs, tr.pad_id)
    with torch.no_grad():
        logp, _ = response_logprobs(tr.models.policy, b)
    r = b.response_ids.shape[1]
    loss, _ = policy_loss(logp, prep.old_logprobs[:, :r], prep.advantages[:, :r], prep.mask[:, :r])
    return float(loss)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_one_step_changes_parameters_and_lowers_the_loss(tiny_lm, tmp_path, estimator):
    tr = make_trainer(tiny_lm, tmp_path, f"algo.estimator={estimator}", "algo.kl_coef=0.001",
                      *(["algo.group_size=1", "prompts_per_step=4"] if estimator == "gae" else []))
    trajs = make_trajs(tr.tokenizer, 4, tr.cfg.algo.group_size)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    before = {n: p.detach().clone() for n, p in tr.models.policy.named_parameters()}
    prep = tr.prepare(trajs, rewards)
    assert prep.advantages.abs().sum() > 0
    assert prep.old_logprobs is None  # one epoch, one mini-batch: on-policy, no extra forward pass
    with torch.no_grad():
        prep.old_logprobs = response_logprobs(tr.models.policy, collate(trajs, tr.pad_id))[0]
    loss0 = surrogate(tr, trajs, prep)
    metrics = tr.update(trajs, prep)
    changed = [n for n, p in tr.models.policy.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter changed"
    assert surrogate(tr, trajs, prep) < loss0 - 1e-4
    assert metrics["grad_norm"] > 0
    if estimator == "gae":
        assert "value_loss" in metrics


@pytest.mark.parametrize("betas", [None, "[0.9,0.999]"])
def test_a_step_without_contrast_moves_the_policy_only_with_momentum(tiny_lm, tmp_path, betas):
    """The default RL optimizer has no momentum (beta1 = 0): a step whose groups all got one reward
    (zero gradient) leaves the policy where it is; with AdamW's usual beta1 = 0.9 it keeps moving
    along the earlier batch's direction (README, "No momentum in the RL optimizer")."""
    model, tok = tiny_lm
    tr = make_trainer((copy.deepcopy(model), tok), tmp_path, *([f"optim.betas={betas}"] if betas else []))
    assert tr.optimizer.param_groups[0]["betas"] == ((0.0, 0.999) if betas is None else (0.9, 0.999))
    trajs = make_trajs(tok, 4, 2)
    tr.update(trajs, tr.prepare(trajs, torch.tensor([1.0, 0.0, 0.0, 1.0])))
    after_first = {n: p.detach().clone() for n, p in tr.models.policy.named_parameters()}
    flat = tr.prepare(trajs, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # every group uniform: no advantage
    assert flat.advantages.abs().sum() == 0
    tr.update(trajs, flat)
    moved = [n for n, p in tr.models.policy.named_parameters() if not torch.equal(p, after_first[n])]
    assert (not moved) if betas is None else moved


def test_optim_eps_reaches_adamw_and_far_above_the_gradients_makes_it_sgd(tiny_lm, tmp_path):
    """One step without momentum moves each weight by -lr * g / (|g| + eps) (Adam's bias-corrected
    first step): about -lr * sign(g) at the default eps, about SGD at lr / eps where eps is far
    above |g| (the step then follows the gradient's size)."""
    model, tok = tiny_lm
    tr = make_trainer((copy.deepcopy(model), tok), tmp_path, "optim.eps=1.0")
    assert tr.optimizer.param_groups[0]["eps"] == 1.0
    before = {n: p.detach().clone() for n, p in tr.models.policy.named_parameters()}
    grads: dict[str, torch.Tensor] = {}
    step = tr.optimizer.step

    def record_then_step(*a, **k):
        grads.update({n: p.grad.clone() for n, p in tr.models.policy.named_parameters() if p.grad is not None})
        return step(*a, **k)

    tr.optimizer.step = record_then_step
    trajs = make_trajs(tok, 4, 2)
    tr.update(trajs, tr.prepare(trajs, torch.tensor([1.0, 0.0, 0.0, 1.0])))
    lr = tr.optimizer.param_groups[0]["lr"]
    assert grads and max(g.abs().max() for g in grads.values()) < 0.1  # eps = 1: within 10 % of SGD at lr
    for n, p in tr.models.policy.named_parameters():
        if n in grads:
            g = grads[n]
            torch.testing.assert_close(p.detach() - before[n], -lr * g / (g.abs() + 1.0), rtol=1e-2, atol=2e-7)
    assert max((p.detach() - before[n]).abs().max() for n, p in tr.models.policy.named_parameters()) < lr / 10


def _grads_after_accumulation(tiny_lm, tmp_path, micro: int) -> dict[str, torch.Tensor]:
    model, tok = tiny_lm
    tr = make_trainer((copy.deepcopy(model), tok), tmp_path / f"m{micro}", f"micro_batch_size={micro}",
                      "mini_batch_size=8", "prompts_per_step=4", "algo.kl_coef=0.01", "algo.entropy_coef=0.01")
    trajs = make_trajs(tok, 8, 2)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25])
    prep = tr.prepare(trajs, rewards)
    with torch.no_grad():
        old = response_logprobs(tr.models.policy, collate(trajs, tr.pad_id))[0]
    prep.old_logprobs = old - 0.05  # ratio != 1 so clipping and KL terms are live
    norm = tr._normalizer(prep.mask)
    tr._accumulate(trajs, prep, [list(range(i, min(i + micro, 8))) for i in range(0, 8, micro)], norm)
    return {n: p.grad.clone() for n, p in tr.models.policy.named_parameters() if p.grad is not None}


def test_micro_batch_accumulation_invariance(tiny_lm, tmp_path):
    g8 = _grads_after_accumulation(tiny_lm, tmp_path, 8)  # micro 8 x accumulation 1
    g1 = _grads_after_accumulation(tiny_lm, tmp_path, 1)  # micro 1 x accumulation 8
    assert g8.keys() == g1.keys() and g8
    for n in g8:
        torch.testing.assert_close(g1[n], g8[n], rtol=1e-4, atol=1e-6, msg=n)


def test_mask_switch_selects_loss_or_response_mask(tiny_lm, tmp_path):
    trajs = make_trajs(tiny_lm[1], 4, 2)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    masked = make_trainer(tiny_lm, tmp_path / "a").prepare(trajs, rewards)
    unmasked = make_trainer(tiny_lm, tmp_path / "b", "algo.mask_retrieved=false").prepare(trajs, rewards)
    inserted = (masked.mask == 0) & (unmasked.mask == 1)
    assert inserted.sum() == sum(t.loss_mask.count(0) for t in trajs)
    assert torch.all(masked.advantages[inserted] == 0)
    assert torch.all(unmasked.advantages[inserted] != 0)


def test_rollout_step_runs_end_to_end(tiny_lm, tmp_path):
    tr = make_trainer(tiny_lm, tmp_path)
    m = tr.step()
    assert m["step"] == 1 and len(tr.last_trajectories) == 4
    for t in tr.last_trajectories:
        assert len(t.response_ids) == len(t.loss_mask) == len(t.sampler_logprobs)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_sampler_is_resumable():
    a = DataSampler(5, seed=3)
    first = a.next(3)
    b = DataSampler(5, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.next(7) == b.next(7)
    assert sorted(first + DataSampler(5, seed=3).next(5)[3:]) == sorted(DataSampler(5, seed=3).next(5))


def test_balanced_sampler_draws_each_label_equally_and_resumes():
    strata = [1] * 6 + [2] * 14  # 1-hop questions are rarer: they cycle sooner
    a = DataSampler(20, seed=0, strata=strata)
    draws = [a.next(5) for _ in range(6)]
    assert [sum(strata[j] == 1 for j in d) for d in draws] == [3, 2] * 3  # 2 + 2 + the odd one, rotating
    assert len({j for d in draws[:2] for j in d if strata[j] == 1}) == 5  # no repeat inside a label's epoch
    b = DataSampler(20, seed=0, strata=strata)
    b.load_state_dict(a.state_dict())
    assert a.next(8) == b.next(8)
    with pytest.raises(ValueError, match="strata"):
        DataSampler(20, 0, strata).load_state_dict(DataSampler(20, 0).state_dict())


def test_trainer_draws_balanced_hops_when_asked(tiny_lm, tmp_path):
    model, tok = tiny_lm
    cfg = apply_overrides(TrainConfig(), [f"out={tmp_path / 'run'}", "data.balance_hops=true", "prompts_per_step=2",
                                          "algo.group_size=2", "mini_batch_size=4", "micro_batch_size=4"])
    bundle = build_models(cfg.model, need_reference=False, need_critic=False, model=model, tokenizer=tok)
    examples = [QAExample(f"e{i}", f"q{i}", ["a"], extra={"num_hops": 2 if i == 0 else 1}) for i in range(6)]
    tr = Trainer(cfg, bundle, EchoRetriever(), examples)
    assert all(0 in tr.sampler.next(2) for _ in range(4))  # the one 2-hop question is half of every draw


def test_trainer_scores_with_the_search_cost(tiny_lm, tmp_path):
    model, tok = tiny_lm
    cfg = apply_overrides(TrainConfig(), [f"out={tmp_path / 'run'}", "algo.search_cost=0.25"])
    bundle = build_models(cfg.model, need_reference=False, need_critic=False, model=model, tokenizer=tok)
    ex = QAExample("e0", "q0", ["Paris"])
    tr = Trainer(cfg, bundle, EchoRetriever(), [ex])
    turns = [Turn(text="<search>q</search>", action="search", observation="<information>x</information>")] * 2
    trajs = [Trajectory(example=ex, prompt_ids=[1], turns=[*turns[:n], Turn(text=f"<answer>{a}</answer>", action="answer")])
             for n, a in [(1, "Paris"), (2, "Paris"), (2, "Rome")]]
    assert tr.score(trajs).tolist() == [1.0, 0.75, 0.0]


def _reward_only_for(ids):
    """A reward rule for the resampling tests: one sample of each question in ``ids`` is right."""
    return lambda t, ex, cfg: 1.0 if ex.id in ids and t.sample_index == 0 else 0.0


def test_resampling_keeps_the_groups_whose_rewards_differ(tiny_lm, tmp_path, monkeypatch):
    import searchrl.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "compute_reward", _reward_only_for({"e1", "e4"}))
    tr = make_trainer(tiny_lm, tmp_path, "resample_rounds=3")
    tr.train_examples = [QAExample(f"e{i}", f"What is item {i}", [f"a{i}"]) for i in range(6)]
    tr.sampler = DataSampler(6, seed=0)
    first = DataSampler(6, seed=0).next(6)  # the draws the step will make, in order
    m = tr.step()
    ids = [t.example.id for t in tr.last_trajectories]
    assert len(ids) == 4 and ids[0] == ids[1] and ids[2] == ids[3]  # whole groups, in order
    assert set(ids) == {"e1", "e4"} and m["groups_informative"] == 2
    # it stopped drawing as soon as both were found: 2 questions a round
    needed = max(first.index(1), first.index(4)) // 2 + 1
    assert m["questions_drawn"] == 2 * needed and m["resample_rounds"] == needed - 1
    assert tr.sampler.state_dict() == _sampler_after(6, 2 * needed)


def _sampler_after(n: int, k: int) -> dict:
    s = DataSampler(n, seed=0)
    s.next(k)
    return s.state_dict()


def test_resampling_fills_the_step_when_too_few_groups_differ(tiny_lm, tmp_path, monkeypatch):
    import searchrl.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "compute_reward", _reward_only_for(set()))
    tr = make_trainer(tiny_lm, tmp_path, "resample_rounds=2")
    first = [tr.train_examples[i].id for i in DataSampler(4, seed=0).next(2)]
    m = tr.step()
    assert m["resample_rounds"] == 2 and m["groups_informative"] == 0 and m["questions_drawn"] == 6
    assert [t.example.id for t in tr.last_trajectories] == [first[0]] * 2 + [first[1]] * 2  # the first draw's groups
    assert m["grad_norm"] == 0.0  # nothing to learn from: the update moved nothing


def test_resampling_resumes_to_the_same_draws(tiny_lm, tmp_path, monkeypatch):
    """The extra rounds' draws are part of the sampler's checkpointed position and their rollout
    seeds follow the step and the round, so a resumed run rolls out what the uninterrupted one did."""
    import searchrl.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "compute_reward", _reward_only_for({"e1"}))
    a = make_trainer(tiny_lm, tmp_path, "resample_rounds=2")
    a.step()
    a.save()
    a.step()
    expected = [(t.example.id, t.response_ids) for t in a.last_trajectories]
    b = make_trainer(tiny_lm, tmp_path, "resample_rounds=2")
    assert b.resume() and b.step_idx == 1
    b.step()
    assert [(t.example.id, t.response_ids) for t in b.last_trajectories] == expected
    assert "e1" in {i for i, _ in expected}  # the informative group was found again


def test_resampling_needs_groups():
    with pytest.raises(ConfigError, match="^resample_rounds"):
        apply_overrides(TrainConfig(), ["resample_rounds=2", "algo.estimator=gae"])


@pytest.mark.parametrize("override,field", [
    ("algo.estimator=nope", "algo.estimator"),
    ("micro_batch_size=3", "mini_batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("algo.kl_estimator=k9", "algo.kl_estimator"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("optim.eps=0", "optim.eps"),
    ("algo.search_cost=2", "algo.search_cost"),
    ("steps=ten", "steps"),
    ("algo.colour=red", "algo.colour"),
    ("model.dtype=float8", "model.dtype"),
])
def test_bad_config_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [override])
    assert str(e.value).startswith(field), str(e.value)


def test_yaml_configs_in_repo_load(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_yaml_config(TrainConfig, path)
        assert cfg.steps >= 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  group_size: 0\n")
    with pytest.raises(ConfigError, match="algo.group_size"):
        load_yaml_config(TrainConfig, bad)


def test_a_config_file_section_keeps_the_defaults_it_does_not_set(tmp_path):
    """`rollout:` with two fields used to rebuild RolloutConfig from its class defaults (the paper's
    4 turns of 500 tokens), dropping the embedded CPU budgets: configs/miniwiki.yaml ran ~3x slower."""
    from pathlib import Path

    from searchrl.training.config import CPU_ROLLOUT

    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  temperature: 0.7\n  topk: 3\neval_rollout:\n  topk: 2\nalgo:\n")
    cfg = load_yaml_config(TrainConfig, path, ["rollout.max_obs_tokens=320"])
    assert (cfg.rollout.temperature, cfg.rollout.topk, cfg.rollout.max_obs_tokens) == (0.7, 3, 320)
    for key in ("max_turns", "max_new_tokens_per_turn", "max_context_tokens"):
        assert getattr(cfg.rollout, key) == CPU_ROLLOUT[key] == getattr(cfg.eval_rollout_config, key)
    assert cfg.eval_rollout_config.topk == 2 and cfg.algo == TrainConfig().algo  # an empty section: the defaults
    mw = load_yaml_config(TrainConfig, Path(__file__).parents[1] / "configs" / "miniwiki.yaml")
    assert (mw.rollout.max_turns, mw.rollout.max_new_tokens_per_turn) == (CPU_ROLLOUT["max_turns"], 64)
    # the preset keeps the warm-start its README figures were measured with, not the default's since session 22
    assert (mw.warmstart.steps, mw.warmstart.multi_hop_share) == (30, None) != (45, 0.3) == (
        TrainConfig().warmstart.steps, TrainConfig().warmstart.multi_hop_share)
    path.write_text("rollout:\n  max_turnz: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: rollout.max_turnz: unknown field"):
        load_yaml_config(TrainConfig, path)


def test_sft_baseline_data_and_training_lower_the_loss(tiny_lm):
    from searchrl.training.sft import answer_sft_data, sft_train

    model, tok = tiny_lm
    exs = [QAExample(f"e{i}", f"What is item {i}", [f"Gold{i}"]) for i in range(3)]
    data = answer_sft_data(exs, tok)
    assert all(sum(t.loss_mask) == len(t.response_ids) for t in data)
    assert "<answer> Gold0 </answer>" in tok.decode(data[0].response_ids)
    for p in model.parameters():
        p.requires_grad_(True)
    losses = sft_train(model, tok, data, steps=8, batch_size=3, lr=1e-2, micro_batch_size=2, progress=False)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("schedule,expected", [("constant", [0.04] * 4), ("linear", [0.04, 0.03, 0.02, 0.01])])
def test_sft_schedule_sets_each_steps_lr(tiny_lm, monkeypatch, schedule, expected):
    from searchrl.training.sft import answer_sft_data, sft_train

    model, tok = tiny_lm
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    data = answer_sft_data([QAExample("e0", "What is item 0", ["Gold0"])], tok)
    sft_train(model, tok, data, steps=4, batch_size=1, lr=0.04, progress=False, schedule=schedule)
    assert seen == pytest.approx(expected)
    with pytest.raises(ValueError, match="schedule: one of constant, linear"):
        sft_train(model, tok, data, steps=1, batch_size=1, lr=0.04, progress=False, schedule="cosine")



@pytest.mark.parametrize("average_last,averaged_steps", [(0, [4]), (1, [4]), (3, [2, 3, 4]), (9, [0, 1, 2, 3, 4])])
def test_sft_average_last_ends_with_the_mean_of_the_last_steps_weights(tiny_lm, monkeypatch, average_last,
                                                                       averaged_steps):
    from searchrl.training.sft import answer_sft_data, sft_train

    model, tok = tiny_lm
    for p in model.parameters():
        p.requires_grad_(True)
    after_step: list[list[torch.Tensor]] = []  # every weight after each optimiser step
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        after_step.append([p.detach().clone() for p in model.parameters()])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    data = answer_sft_data([QAExample(f"e{i}", f"What is item {i}", [f"Gold{i}"]) for i in range(3)], tok)
    sft_train(model, tok, data, steps=5, batch_size=2, lr=0.02, progress=False, average_last=average_last)
    assert len(after_step) == 5
    for i, p in enumerate(model.parameters()):
        mean = torch.stack([after_step[k][i] for k in averaged_steps]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)
    # the steps really moved the weights, so the mean differs from the last step's unless only it counts
    moved = any(not torch.allclose(a, b) for a, b in zip(after_step[2], after_step[4]))
    assert moved
def test_demonstrations_replay_hop_chains_through_the_loop(tiny_tokenizer):
    from searchrl.data.world import generate_world
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.rollout.config import RolloutConfig
    from searchrl.training.sft import demonstrations

    world = generate_world(seed=1, n_entities=80)
    retriever = BM25Retriever.build(world.passages, show_progress=False)
    demos = demonstrations(world.questions, tiny_tokenizer, retriever, RolloutConfig(), limit=10)
    assert len(demos) >= 8  # a demo is kept only when it ends with the gold answer
    for d in demos:
        assert d.num_searches == d.example.extra["num_hops"]
        assert d.finish_reason == "answer"
        info = [i for i, m in enumerate(d.loss_mask) if m == 0]
        assert info and "<information>" in tiny_tokenizer.decode([d.response_ids[i] for i in info])


def test_comparison_demonstrations_search_both_entities_and_answer_the_comparison(tiny_tokenizer):
    from searchrl.data.world import generate_world
    from searchrl.data.world_comparisons import comparison_questions
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.rollout.config import RolloutConfig
    from searchrl.training.sft import demonstrations

    world = generate_world(seed=1, n_entities=200)
    retriever = BM25Retriever.build(world.passages, show_progress=False)
    questions = comparison_questions(world.questions, 12, seed=0)
    for style in ("plan", "stepwise"):
        demos = demonstrations(questions, tiny_tokenizer, retriever, RolloutConfig(), limit=12, style=style)
        assert len(demos) == 12  # every scripted comparison ends with its gold answer
        for d in demos:
            a, b = d.example.extra["hops"]
            assert [t.query for t in d.turns if t.action == "search"] == [a["query"], b["query"]]
            assert d.answer == d.example.golden_answers[0]


def test_warm_start_demonstrations_can_be_drawn_in_a_share_of_multi_hop_questions(tiny_tokenizer):
    from searchrl.data.world import generate_world
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.rollout.config import RolloutConfig
    from searchrl.training.sft import demonstrations_by_hops

    world = generate_world(seed=1, n_entities=80)
    retriever = BM25Retriever.build(world.passages, show_progress=False)
    questions = [q for q in world.questions if len(q.extra["hops"]) <= 2]

    def hops(share):
        demos = demonstrations_by_hops(questions, tiny_tokenizer, retriever, RolloutConfig(), 12, share)
        return sorted(d.num_searches for d in demos)

    assert set(hops(0.0)) == {1} and set(hops(1.0)) == {2}  # the scripts search once per hop
    quarter = hops(0.25)
    assert 1 <= quarter.count(2) <= 3 and 7 <= quarter.count(1) <= 9
    assert apply_overrides(TrainConfig(), ["warmstart.multi_hop_share=0.3"]).warmstart.multi_hop_share == 0.3
    with pytest.raises(ConfigError, match="warmstart.multi_hop_share"):
        apply_overrides(TrainConfig(), ["warmstart.multi_hop_share=2"])


def test_warmstart_comparisons_is_a_share():
    assert apply_overrides(TrainConfig(), ["warmstart.comparisons=0.25"]).warmstart.comparisons == 0.25
    with pytest.raises(ConfigError, match="warmstart.comparisons"):
        apply_overrides(TrainConfig(), ["warmstart.comparisons=1.5"])


def test_warmstart_average_last_is_a_step_count():
    assert apply_overrides(TrainConfig(), ["warmstart.average_last=10"]).warmstart.average_last == 10
    with pytest.raises(ConfigError, match="warmstart.average_last"):
        apply_overrides(TrainConfig(), ["warmstart.average_last=-1"])


def _warm_started_weights(tiny_tokenizer, tmp_path, *overrides: str) -> dict[str, torch.Tensor]:
    from searchrl.testing import tiny_random_lm
    from searchrl.training.pipeline import _warm_start, load_data

    cfg = apply_overrides(TrainConfig(), [f"out={tmp_path}", "model.amp=off", "model.device=cpu",
                                          "data.world_entities=60", "warmstart.steps=3", "warmstart.lr=5e-2",
                                          "warmstart.examples=12", "micro_batch_size=4", *overrides])
    train, _, retriever = load_data(cfg)
    models = build_models(cfg.model, need_reference=False, need_critic=False,
                          model=tiny_random_lm(tiny_tokenizer, seed=0), tokenizer=tiny_tokenizer)
    tmp_path.mkdir()
    _warm_start(cfg, models, train, retriever, tmp_path)
    return {k: v.clone() for k, v in models.policy.state_dict().items()}


def test_the_warm_start_has_its_own_seed(tiny_tokenizer, tmp_path, monkeypatch):
    """`seed` varies RL only: by default every run seed starts RL from the same warm-started weights;
    `warmstart.seed=null` makes the warm-start's draw and order follow the run's seed again."""
    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    base = _warm_started_weights(tiny_tokenizer, tmp_path / "s0", "seed=0")
    other_seed = _warm_started_weights(tiny_tokenizer, tmp_path / "s1", "seed=1")
    following = _warm_started_weights(tiny_tokenizer, tmp_path / "s1f", "seed=1", "warmstart.seed=null")
    warm_seed_1 = _warm_started_weights(tiny_tokenizer, tmp_path / "w1", "seed=0", "warmstart.seed=1")
    assert all(torch.equal(base[k], other_seed[k]) for k in base)
    assert any(not torch.equal(base[k], following[k]) for k in base)  # the seed reaches the warm-start
    assert all(torch.equal(following[k], warm_seed_1[k]) for k in base)  # ... as warmstart.seed would


def test_sft_mode_needs_direct_method():
    with pytest.raises(ConfigError, match="method"):
        apply_overrides(TrainConfig(), ["mode=sft"])
    assert apply_overrides(TrainConfig(), ["mode=sft", "method=direct"]).mode == "sft"
