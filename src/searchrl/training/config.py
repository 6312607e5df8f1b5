"""The training configuration: nested dataclasses with help text, checked before any work starts.

``TrainConfig`` is what ``searchrl train`` runs; YAML files in ``configs/`` fill it and dotted
overrides (``algo.kl_coef=0.01``) adjust it. Defaults are the embedded CPU default (synthetic world,
in-process BM25, SmolLM2-135M-Instruct, GRPO); the paper presets live in ``configs/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from searchrl.algos.advantages import ADVANTAGE_ESTIMATORS
from searchrl.algos.losses import AGGREGATIONS, KL_ESTIMATORS
from searchrl.config import check, from_dict, to_dict
from searchrl.errors import ConfigError
from searchrl.models import AMP_MODES
from searchrl.rewards import REWARD_KINDS
from searchrl.rollout.loop import RolloutConfig
from searchrl.training.distributed import STRATEGIES
from searchrl.training.sft import DEMO_STYLES, LR_SCHEDULES


# The embedded CPU default's rollout budgets: short turns and a short context keep a 2-core run in
# minutes (the paper's 500 / 500 / 4096 and top-3 are in the configs/ presets). Two search turns cover
# the synthetic world's 1- and 2-hop questions (data.max_hops=2 leaves its 3-hop ones out). Training
# rollouts sample at temperature 1.0 (after the warm-start the policy is nearly deterministic, and at
# 0.7 a group's samples were too often identical to carry any advantage) within the top-p 0.7 nucleus:
# the tail tokens it cuts were what flipped the warm-started plan one way or the other (over three
# seeds: mean gain +0.095 against +0.006 at top-p 1.0, worst seed -0.025 against -0.217; the README).
CPU_ROLLOUT = dict(max_turns=2, topk=2, max_new_tokens_per_turn=64, max_obs_tokens=200, max_context_tokens=1024)


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModelConfig:
    name: str | None = field(default=None, metadata=_h("policy model: local path or hub id; None = SmolLM2-135M-Instruct (bundled)"))
    dtype: str = field(default="float32", metadata=_h("float32 | bfloat16 (training and generation)"))
    device: str = field(default="auto", metadata=_h("auto | cpu | cuda | cuda:N"))
    lora_r: int = field(default=0, metadata=_h("LoRA rank; 0 = full fine-tuning"))
    lora_alpha: int = field(default=32, metadata=_h("LoRA alpha"))
    lora_dropout: float = field(default=0.0, metadata=_h("LoRA dropout"))
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], metadata=_h("module names LoRA adapts"))
    gradient_checkpointing: bool = field(default=False, metadata=_h("recompute activations in backward to save memory"))
    amp: str = field(default="auto", metadata=_h("mixed precision over fp32 weights: bf16 autocast in training, a bf16 copy of the weights in generation: auto (where the hardware has native bf16) | bf16 | off"))
    amp_copy: bool = field(default=True, metadata=_h("with amp: generate on a bf16 copy of the weights (faster decoding than autocast, see the README; costs half the fp32 weights' memory more) instead of under autocast"))
    critic_name: str | None = field(default=None, metadata=_h("critic base model (PPO); None = same as the policy"))
    backend: str = field(default="hf", metadata=_h("generation engine: hf (the policy itself generates) | vllm (a vLLM engine over model.name, weights synced after each optimizer step)"))
    vllm_gpu_memory_utilization: float = field(default=0.5, metadata=_h("vllm: fraction of GPU memory the engine may take (weights + KV cache); colocated with training, leave room for it"))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_h("vllm: GPUs one engine spans (tensor parallel)"))
    vllm_sleep: bool = field(default=False, metadata=_h("vllm, GPU: put the engine to sleep during the update (frees its KV cache memory) and wake it before the next rollout"))
    vllm_max_model_len: int = field(default=0, metadata=_h("vllm: the engine's context length (0 = the model's own)"))

    def __post_init__(self) -> None:
        check(self.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        check(self.amp in AMP_MODES, "model.amp", f"must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        check(self.lora_r >= 0, "model.lora_r", "must be >= 0")
        check(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", "must be in [0, 1)")
        check(self.backend in ("hf", "vllm"), "model.backend", f"must be hf or vllm, got {self.backend!r}")
        check(0.0 < self.vllm_gpu_memory_utilization <= 1.0, "model.vllm_gpu_memory_utilization", "must be in (0, 1]")
        check(self.vllm_tensor_parallel_size >= 1, "model.vllm_tensor_parallel_size", "must be >= 1")
        check(self.vllm_max_model_len >= 0, "model.vllm_max_model_len", "must be >= 0")
        check(not (self.backend == "vllm" and self.lora_r), "model.backend",
              "vllm with LoRA (model.lora_r > 0) is not supported: the engine syncs full weights")


@dataclass
class DataConfig:
    world_seed: int = field(default=0, metadata=_h("seed of the synthetic world (used when train_files is empty)"))
    world_entities: int = field(default=0, metadata=_h("entities in the synthetic world; 0 = the embedded default size"))
    world_filler: float = field(default=0.3, metadata=_h("filler text in world passages, 0-1 (shorter passages = cheaper rollouts)"))
    train_files: list[str] = field(default_factory=list, metadata=_h("QA files to train on (any supported format); empty = the synthetic world"))
    eval_files: list[str] = field(default_factory=list, metadata=_h("QA files to evaluate on; empty = the world's test split"))
    corpus: str | None = field(default=None, metadata=_h("corpus JSONL to index in-process (with train_files)"))
    index: str | None = field(default=None, metadata=_h("a built index directory (searchrl index)"))
    index_mmap: bool = field(default=False, metadata=_h("with data.index: memory-map the index files (start-up in seconds, RSS grows with use)"))
    search_cache: str | None = field(default=None, metadata=_h("with data.index: a SQLite file recording every search (repeats and reruns replay it byte for byte)"))
    retriever_url: str | None = field(default=None, metadata=_h("a running /retrieve server instead of an in-process index (several: comma-separated, round-robin with failover)"))
    retriever_wait: float = field(default=60.0, metadata=_h("seconds to keep retrying an unreachable retrieval server before the run stops"))
    train_limit: int = field(default=0, metadata=_h("use at most this many training questions (0 = all)"))
    eval_limit: int = field(default=120, metadata=_h("evaluate on at most this many questions per set (0 = all); the default 120 keeps a 0.10 gain on the synthetic world out of the noise"))
    balance_hops: bool = field(default=True, metadata=_h("draw each step's questions equally from each hop count when every training question has one, as in the synthetic world (otherwise ignored); fewer steps dominated by one kind, whose plan RL then pushes onto every question (README, session 18)"))
    max_hops: int = field(default=2, metadata=_h("keep questions with at most this many hops (when known, as in the synthetic world; 0 = all)"))

    def __post_init__(self) -> None:
        check(self.world_entities >= 0, "data.world_entities", "must be >= 0")
        check(self.max_hops >= 0, "data.max_hops", "must be >= 0")
        check(self.train_limit >= 0 and self.eval_limit >= 0, "data.eval_limit", "limits must be >= 0")
        check(not (self.index and self.retriever_url), "data.index", "give either index or retriever_url, not both")
        check(not (self.train_files and not (self.corpus or self.index or self.retriever_url)),
              "data.train_files", "training on your own files needs data.corpus, data.index or data.retriever_url")


@dataclass
class AlgoConfig:
    estimator: str = field(default="grpo", metadata=_h(f"advantage estimator: {' | '.join(sorted(ADVANTAGE_ESTIMATORS))}"))
    group_size: int = field(default=4, metadata=_h("rollouts per prompt (GRPO/RLOO groups)"))
    norm_by_std: bool = field(default=True, metadata=_h("GRPO: divide by the group std"))
    clip_eps: float = field(default=0.2, metadata=_h("PPO clip epsilon"))
    clip_eps_high: float | None = field(default=None, metadata=_h("upper clip epsilon (None = clip_eps)"))
    dual_clip: float | None = field(default=None, metadata=_h("dual-clip constant c > 1 (None = off)"))
    loss_agg: str = field(default="token-mean", metadata=_h(f"loss aggregation: {' | '.join(AGGREGATIONS)}"))
    kl_coef: float = field(default=0.0, metadata=_h("KL coefficient (0 = no reference model; the paper: 0.001)"))
    kl_in_reward: bool = field(default=False, metadata=_h("KL as an in-reward penalty (PPO paper setting) instead of a loss"))
    kl_estimator: str = field(default="low_var_kl", metadata=_h(f"KL estimator: {' | '.join(KL_ESTIMATORS)}"))
    entropy_coef: float = field(default=0.0, metadata=_h("entropy bonus coefficient"))
    value_clip: float = field(default=0.5, metadata=_h("value-loss clip range (PPO)"))
    vf_coef: float = field(default=1.0, metadata=_h("value-loss weight (PPO)"))
    gamma: float = field(default=1.0, metadata=_h("GAE / returns discount"))
    lam: float = field(default=1.0, metadata=_h("GAE lambda"))
    mask_retrieved: bool = field(default=True, metadata=_h("mask inserted (retrieved) tokens out of every loss; False = the paper's ablation"))
    reward: str = field(default="em", metadata=_h(f"reward: {' | '.join(REWARD_KINDS)}"))
    search_cost: float = field(default=0.0, metadata=_h("a rewarded answer loses this fraction of its reward per search after the first (0 = the paper)"))

    def __post_init__(self) -> None:
        check(self.estimator in ADVANTAGE_ESTIMATORS, "algo.estimator", f"unknown {self.estimator!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}")
        check(self.group_size >= 1, "algo.group_size", "must be >= 1")
        check(self.estimator not in ("grpo", "rloo") or self.group_size >= 2, "algo.group_size", f"{self.estimator} needs groups of >= 2")
        check(self.clip_eps > 0, "algo.clip_eps", "must be > 0")
        check(self.dual_clip is None or self.dual_clip > 1, "algo.dual_clip", "must be > 1")
        check(self.loss_agg in AGGREGATIONS, "algo.loss_agg", f"unknown {self.loss_agg!r}; valid: {list(AGGREGATIONS)}")
        check(self.kl_coef >= 0, "algo.kl_coef", "must be >= 0")
        check(self.kl_estimator in KL_ESTIMATORS, "algo.kl_estimator", f"unknown {self.kl_estimator!r}; valid: {list(KL_ESTIMATORS)}")
        check(self.kl_in_reward or self.kl_coef == 0 or self.kl_estimator not in ("k1", "kl", "abs"), "algo.kl_estimator",
              f"{self.kl_estimator!r} cannot be a KL loss: on tokens sampled from the policy its gradient has mean "
              "zero (k1) or no useful direction (abs), so the term adds only noise; use low_var_kl (k3) or k2 as "
              "a loss, or keep k1 with algo.kl_in_reward=true")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "algo.gamma", "gamma and lam must be in [0, 1]")
        check(self.reward in REWARD_KINDS, "algo.reward", f"unknown {self.reward!r}; valid: {list(REWARD_KINDS)}")
        check(0 <= self.search_cost <= 1, "algo.search_cost", "must be in [0, 1]")

    @property
    def needs_critic(self) -> bool:
        return self.estimator == "gae"


@dataclass
class OptimConfig:
    lr: float = field(default=2e-5, metadata=_h("actor learning rate (AdamW; with the default eps the step is ~lr / eps times the gradient, see eps); the embedded default's 2e-5 (4e-5 in sessions 18-21) moves the plan's shared bias less per step, so six steps stop before the 1-hop questions (README, session 22)"))
    critic_lr: float = field(default=1e-5, metadata=_h("critic learning rate"))
    warmup_steps: int = field(default=0, metadata=_h("actor: linear warm-up steps, then constant"))
    critic_warmup_steps: int = field(default=0, metadata=_h("critic: linear warm-up steps, then constant"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay"))
    grad_clip: float = field(default=1.0, metadata=_h("max gradient norm (0 = off)"))
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999], metadata=_h(
        "AdamW betas; beta1 = 0 (no momentum): each step follows its own on-policy batch instead of an average "
        "that keeps pushing earlier policies' gradients (README, 'No momentum in the RL optimizer'); "
        "the paper's presets pin [0.9, 0.999]"))
    eps: float = field(default=1e-4, metadata=_h("AdamW epsilon (added to the root of the second moment). The embedded default's 1e-4 lies above most weights' gradients, so steps are close to SGD at lr / eps and follow the gradient's size: weights with little net evidence barely move, where Adam at 1e-8 moves every weight by ~lr (README, session 18); the paper's presets pin 1e-8"))
    nonfinite_patience: int = field(default=3, metadata=_h("stop the run after this many optimizer steps in a row skipped for a non-finite loss or gradient"))

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", "must be > 0")
        check(self.critic_lr > 0, "optim.critic_lr", "must be > 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.critic_warmup_steps >= 0, "optim.critic_warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)")
        check(self.eps > 0, "optim.eps", "must be > 0")
        check(self.nonfinite_patience >= 1, "optim.nonfinite_patience", "must be >= 1")


@dataclass
class WarmStartConfig:
    steps: int = field(default=45, metadata=_h("SFT format warm-start steps on synthetic demonstrations (0 = off); the embedded default's 45 (30 until session 22) leave the warm-started model ranking nearly every 2-hop question above every 1-hop one in its odds of a second search (README, session 22)"))
    batch_size: int = field(default=4, metadata=_h("demonstrations per warm-start step"))
    lr: float = field(default=5e-5, metadata=_h("warm-start learning rate"))
    schedule: str = field(default="constant", metadata=_h("warm-start learning-rate schedule: constant | linear (decays to 0 over the steps)"))
    average_last: int = field(default=0, metadata=_h("end the warm-start with the mean of the weights after each of its last N steps (0 = the last step's weights)"))
    examples: int = field(default=256, metadata=_h("demonstrations to synthesise from training questions"))
    style: str = field(default="plan", metadata=_h("demonstrations' thoughts: plan (the first thought states how many searches the question takes) | stepwise (after each search, whether the question is answered yet)"))
    comparisons: float = field(default=0.0, metadata=_h("share of the demonstrations that compare two entities (which came first; do they share a value: yes / no), built from the hop chains' facts; real multi-hop sets such as 2Wiki ask mostly these"))
    multi_hop_share: float | None = field(default=0.3, metadata=_h("share of the (non-comparison) demonstrations whose questions take more than one search; None = as they come in the training questions (about one half in the synthetic world). The embedded default's 0.3 (None until session 22) leaves the warm-started model planning one search for nearly every question while it still ranks the 2-hop questions first, so RL has the 2-hop questions to win and a margin before the 1-hop ones (README, session 22)"))
    seed: int | None = field(default=0, metadata=_h("seed of the warm-start's demonstration draw and order, fixed so that the run's `seed` varies RL alone, as seeds vary RL over one pretrained checkpoint in the paper (README: 'The default over three seeds, one warm-start for all'); None = the run's seed"))

    def __post_init__(self) -> None:
        check(self.steps >= 0, "warmstart.steps", "must be >= 0")
        check(self.batch_size >= 1, "warmstart.batch_size", "must be >= 1")
        check(self.lr > 0, "warmstart.lr", "must be > 0")
        check(self.average_last >= 0, "warmstart.average_last", "must be >= 0 (more than warmstart.steps averages them all)")
        check(self.schedule in LR_SCHEDULES, "warmstart.schedule", f"one of {', '.join(LR_SCHEDULES)}, got {self.schedule!r}")
        check(self.style in DEMO_STYLES, "warmstart.style", f"one of {', '.join(DEMO_STYLES)}, got {self.style!r}")
        check(0.0 <= self.comparisons <= 1.0, "warmstart.comparisons", "must be in [0, 1]")
        check(self.multi_hop_share is None or 0.0 <= self.multi_hop_share <= 1.0, "warmstart.multi_hop_share",
              "must be in [0, 1] (or null: as the training questions come)")


@dataclass
class ParallelConfig:
    strategy: str = field(default="fsdp", metadata=_h("with several processes (torchrun / --nproc): fsdp (FSDP2 shards of policy, reference, critic) | replicate (a whole copy per rank, gradients all-reduced; for LoRA and small models)"))
    cpu_offload: bool = field(default=False, metadata=_h("fsdp: keep parameter shards and optimizer state in CPU memory"))
    timeout_s: float = field(default=1800.0, metadata=_h("seconds a rank waits in a collective before the job fails (a dead rank ends the job instead of hanging it)"))

    def __post_init__(self) -> None:
        check(self.strategy in STRATEGIES, "parallel.strategy", f"one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check(self.timeout_s > 0, "parallel.timeout_s", "must be > 0")


@dataclass
class TrainConfig:
    out: str = field(default="runs/default", metadata=_h("run directory (config, metrics, checkpoints, report)"))
    seed: int = field(default=0, metadata=_h("seed for RL's data order, sampling and initialisation (the warm-start has its own: warmstart.seed)"))
    steps: int = field(default=6, metadata=_h("RL steps"))
    prompts_per_step: int = field(default=8, metadata=_h("questions per RL step (each sampled group_size times)"))
    resample_rounds: int = field(default=0, metadata=_h("GRPO/RLOO: keep a step's groups whose rewards differ and draw up to this many further rounds of questions until prompts_per_step such groups are found (the rest of the step is filled with groups of equal rewards, which teach nothing); DAPO's dynamic sampling; the step's reward and EM are then the kept groups'; 0 = off; one process only"))
    mini_batch_size: int = field(default=32, metadata=_h("trajectories per optimiser step"))
    micro_batch_size: int = field(default=2, metadata=_h("trajectories per forward/backward (gradient accumulation)"))
    ppo_epochs: int = field(default=1, metadata=_h("passes over each step's rollouts"))
    rollout_batch_size: int = field(default=32, metadata=_h("trajectories generated concurrently"))
    save_every: int = field(default=10, metadata=_h("checkpoint every N steps (and at the end)"))
    keep_checkpoints: int = field(default=1, metadata=_h("checkpoints kept on disk"))
    eval_every: int = field(default=0, metadata=_h("validation EM every N steps (0 = only before and after)"))
    eval_before: bool = field(default=True, metadata=_h("evaluate the model as RL starts"))
    report: bool = field(default=True, metadata=_h("write the HTML report at the end"))
    method: str = field(default="search", metadata=_h("rollout prompt: search | direct | cot | rag"))
    mode: str = field(default="rl", metadata=_h("rl | sft (paper's SFT baseline: question -> gold answer) | rejection (SFT on the policy's own correct trajectories); sft/rejection use steps as SFT steps of mini_batch_size"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(**CPU_ROLLOUT, temperature=1.0, top_p=0.7))
    eval_rollout: dict[str, Any] = field(default_factory=dict, metadata=_h("evaluation rollout: only the rollout.* fields that differ; every other field follows rollout, greedy (temperature 0); the resolved budgets are written to the run's config.yaml"))
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be >= 0")
        check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        check(self.resample_rounds >= 0, "resample_rounds", "must be >= 0")
        check(self.resample_rounds == 0 or self.algo.estimator in ("grpo", "rloo"), "resample_rounds",
              f"needs groups whose rewards can be compared (grpo or rloo), not {self.algo.estimator!r}")
        check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        check(self.mini_batch_size >= self.micro_batch_size, "mini_batch_size", "must be >= micro_batch_size")
        check(self.mini_batch_size % self.micro_batch_size == 0, "mini_batch_size", "must be a multiple of micro_batch_size")
        check(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        check(self.save_every >= 1, "save_every", "must be >= 1")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(self.method in ("search", "direct", "cot", "rag"), "method", "must be search, direct, cot or rag")
        check(self.rollout_batch_size >= 1, "rollout_batch_size", "must be >= 1")
        check(self.mode in ("rl", "sft", "rejection"), "mode", f"must be rl, sft or rejection, got {self.mode!r}")
        check(self.mode != "sft" or self.method == "direct", "method", "mode=sft trains question -> answer: set method=direct")
        check(self.model.dtype == "float32" or self.model.lora_r > 0, "model.dtype",
              f"{self.model.dtype} weights with full fine-tuning: AdamW would update the {self.model.dtype} weights "
              "directly, and at RL learning rates most steps are below half a bf16 ulp, so the weights barely "
              "move; use model.dtype=float32 with model.amp=bf16 (fp32 master weights, bf16 compute), or LoRA "
              "(model.lora_r > 0; its adapters stay float32 over the bf16 base)")
        self.eval_rollout_config  # validates the evaluation overrides now, not at the first evaluation

    @property
    def eval_rollout_config(self) -> RolloutConfig:
        """The evaluation budgets: ``rollout`` made greedy, with the fields of ``eval_rollout`` over it."""
        base = {**to_dict(self.rollout), "temperature": 0.0, "top_p": 1.0}
        if not isinstance(self.eval_rollout, dict):
            raise ConfigError(f"eval_rollout: expected a mapping of rollout fields, got {self.eval_rollout!r}")
        return from_dict(RolloutConfig, {**base, **self.eval_rollout}, prefix="eval_rollout.")

    def resolved(self) -> dict[str, Any]:
        """The config as a mapping, with ``eval_rollout`` spelled out in full (for ``config.yaml``)."""
        data = to_dict(self)
        data["eval_rollout"] = to_dict(self.eval_rollout_config)
        return data

    @property
    def trajectories_per_step(self) -> int:
        return self.prompts_per_step * self.algo.group_size
