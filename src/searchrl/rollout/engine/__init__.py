"""The inference engine under the rollout loop: the generation protocol and its backends.

* :mod:`~searchrl.rollout.engine.protocol`: what the loop asks of a backend (``generate`` a batch,
  or ``stream`` a continuous batch) and what it gets back (:class:`Completion`);
* :mod:`~searchrl.rollout.engine.hf`: any transformers causal LM, our own decoding over a KV
  cache (:mod:`~searchrl.rollout.engine.kv_cache`, :mod:`~searchrl.rollout.engine.sampling`);
* :mod:`~searchrl.rollout.engine.vllm_backend`: vLLM's offline engine (optional);
* :mod:`~searchrl.rollout.engine.factory`: :func:`make_generator`, a backend by name.

Nothing here knows about searches, turns or rewards (that is the agent logic in
:mod:`searchrl.rollout`). Importing this package imports no backend (and not torch).
"""
