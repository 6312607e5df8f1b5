"""Multi-turn search rollouts: the agent logic over an inference engine.

Agent logic here: the loop and its one scheduler (:mod:`~searchrl.rollout.loop`), its budgets
(:mod:`~searchrl.rollout.config`), the action parser, the prompts and the fitting of observations
into the context. The inference engine (backends, KV cache, sampling) is
:mod:`searchrl.rollout.engine`; the loop talks to it only through its protocol.
"""
