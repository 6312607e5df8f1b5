"""The loop's continuous schedule over vLLM's own continuous batching: :class:`VLLMStream`.

Rows are requests of the engine behind ``vllm.LLM`` (``llm.llm_engine``): :meth:`VLLMStream.add`
sends one at once (``add_request``, prompt token ids, the row's own seed and budget), and each
:meth:`VLLMStream.step` runs one engine step (vLLM's scheduler decides which requests run: new
ones are prefilled while running ones decode) and returns the requests that finished, mapped
to :class:`~searchrl.rollout.engine.protocol.Completion` exactly as the batch ``generate`` does.
A trajectory's next turn is added as soon as its observation is ready; its shared prefix (the
previous turns) comes from vLLM's prefix cache, so nothing is kept per key here.

Requests ask for their final output only (``RequestOutputKind.FINAL_ONLY``). Closing the stream
aborts whatever is still queued or running, so no request outlives it.

Left out: priorities and preemption policy (vLLM's scheduler decides), streaming partial
outputs, several streams over one engine at the same time.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import replace
from typing import Any

from searchrl.errors import SearchRLError
from searchrl.rollout.engine.protocol import Completion, SamplingParams

_ids = itertools.count()


class VLLMStream:
    """A continuous batch over a :class:`~searchrl.rollout.engine.vllm_backend.VLLMGenerator`'s
    engine (see the module docstring). ``calls`` counts engine steps; ``sampling``'s own seed and
    ``max_new_tokens`` are not used (both are per row). Use it as a context manager."""

    def __init__(self, gen: Any, sampling: SamplingParams, stop: list[str] | None):
        self.gen, self.sampling, self.stop = gen, sampling, list(stop or [])
        self.calls = 0
        self._open = False
        self._prefix = f"searchrl-{next(_ids)}-"
        self._keys: dict[str, Hashable] = {}  # request id -> key, while queued or running
        self._ended: list[tuple[Hashable, Completion]] = []  # zero budgets: finished at add

    @property
    def engine(self) -> Any:
        return self.gen.llm.llm_engine

    def __enter__(self) -> VLLMStream:
        if self.engine.has_unfinished_requests():
            raise SearchRLError("stream: the vLLM engine is already running other requests")
        self.gen.ensure_awake(use=True)
        self._open = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._keys:
            self.engine.abort_request(list(self._keys))
        self._keys, self._ended, self._open = {}, [], False

    @property
    def busy(self) -> bool:
        """Whether a request is queued or running (``step`` has work)."""
        return bool(self._keys or self._ended)

    def add(self, key: Hashable, prompt: list[int], max_new_tokens: int, seed: int | None = None) -> None:
        """Send one request to the engine; it is scheduled at the next :meth:`step`."""
        if not self._open:
            raise SearchRLError("stream: use it as a context manager (with generator.stream(...) as s)")
        if key in self._keys.values() or any(k == key for k, _ in self._ended):
            raise SearchRLError(f"stream: key {key!r} is already queued or running")
        sampling = replace(self.sampling, max_new_tokens=int(max_new_tokens), seed=seed)
        self.gen.check([prompt], sampling)
        if sampling.max_new_tokens == 0:
            self._ended.append((key, Completion([], [], "length")))
            return
        rid = f"{self._prefix}{next(_ids)}"
        params = self.gen.request_params(sampling, self.stop, index=0, final_only=True)
        self.engine.add_request(rid, {"prompt_token_ids": list(prompt)}, params)
        self._keys[rid] = key

    def release(self, key: Hashable) -> None:
        """Nothing is kept per key (vLLM's prefix cache holds the shared prefixes)."""

    def step(self) -> list[tuple[Hashable, Completion]]:
        """One engine step; the requests that finished, as ``(key, Completion)``."""
        if not self._open:
            raise SearchRLError("stream: use it as a context manager (with generator.stream(...) as s)")
        self.calls += 1
        out, self._ended = self._ended, []
        if not self._keys:
            return out
        for res in self.engine.step():
            if not res.finished or res.request_id not in self._keys:
                continue
            key = self._keys.pop(res.request_id)
            out.append((key, self.gen.completion(res.outputs[0])))
        return out
