"""KV-cache reuse for :class:`~searchrl.rollout.engine.hf.HFGenerator`: kept rows, shared prefixes.

Pieces (all on plain per-layer key/value tensors of a transformers ``DynamicCache``):

* :class:`KVStore` keeps, after a ``generate`` call, each returned row's KV (its prompt and its
  sampled tokens but the last, i.e. every token the model has run) as one tensor
  ``(layers, 2, kv_heads, n, head_dim)``. :meth:`KVStore.match` finds for each new prompt the kept
  row sharing the longest prefix with it (vectorised over all kept rows); that prefix's KV is not
  recomputed. A kept row that a prompt continues in full is replaced by the new one; a kept row not
  continued for ``keep_calls`` calls is dropped, so memory is bounded by the rows of the last
  ``keep_calls`` calls.
* :func:`shared_groups` finds rows of one call that start from the same past and share a further
  prefix (the instruction template; a GRPO group's copies of one prompt): the generator runs each
  such prefix once and gives it to every row of the group.
* :func:`past_cache` assembles a batch from rows with pasts of different lengths: pasts are
  left-padded into one cache, the new tokens are left-padded after them, so a row is
  ``[pad][past][pad][new]``; the attention mask has holes at the pads and the position ids count
  real tokens only (see :func:`batch_layout`), so every row computes what it would alone.
  :func:`row_kv` takes a row's real columns back out. :func:`length_buckets` splits a prefill
  whose rows' new parts differ much in length into batches of similar lengths, and
  :func:`merge_caches` joins their caches into one for decoding (or new rows into a running
  batch); :func:`trim_left` drops the leading columns that no remaining row attends to.
* :func:`weights_fingerprint` identifies the weights (each parameter's storage and in-place
  version counter, which ``optimizer.step`` and ``load_state_dict`` bump): kept KV computed under
  other weights is never used.

Left out: sliding-window, hybrid (linear attention) and quantized caches (:func:`reuse_unsupported`
says why; the generator then runs without reuse), paged storage or copy-free views of shared
prefixes (a shared prefix is copied into each row of the batch cache), offloading kept rows to CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class KVEntry:
    """One kept row: the keys/values ``kv`` (layers, 2, H, n, D) of ``tokens`` (n of them)."""

    tokens: list[int]
    kv: torch.Tensor  # (layers, 2, kv_heads, n, head_dim)
    idle: int = 0  # generate calls since it was made without a prompt continuing it


@dataclass
class KVStats:
    """Prompt tokens of a generator's calls: run through the model, taken from kept rows, and
    not run again thanks to a prefix shared within a call."""

    prefilled_tokens: int = 0
    reused_tokens: int = 0
    shared_tokens: int = 0


@dataclass
class Match:
    """The kept row a prompt starts from: its first ``length`` tokens are the prompt's."""

    entry: KVEntry
    length: int


class KVStore:
    """Kept rows of the last calls (see the module docstring for the lifetime rule)."""

    def __init__(self, keep_calls: int = 2):
        self.keep_calls = keep_calls
        self.entries: list[KVEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def cached_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    def clear(self) -> None:
        self.entries = []

    def match(self, prompts: list[list[int]], min_length: int = 1) -> list[Match | None]:
        """Per prompt, the kept row with the longest common prefix (at most ``len(prompt) - 1``
        tokens, so at least one token is left to run), or ``None`` below ``min_length``."""
        if not self.entries or not prompts:
            return [None] * len(prompts)
        width = max(max(len(e.tokens) for e in self.entries), max(len(p) for p in prompts))
        kept = torch.full((len(self.entries), width), -1, dtype=torch.long)  # (E, W)
        for i, e in enumerate(self.entries):
            kept[i, : len(e.tokens)] = torch.tensor(e.tokens, dtype=torch.long)
        new = torch.full((len(prompts), width), -2, dtype=torch.long)  # (B, W): never equals -1
        for i, p in enumerate(prompts):
            new[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        out: list[Match | None] = []
        for i, p in enumerate(prompts):  # one prompt at a time: (E, W) memory, not (B, E, W)
            differ = new[i] != kept  # (E, W)
            lcp = torch.where(differ.any(-1), differ.int().argmax(-1), width)  # (E,)
            n, which = lcp.clamp(max=len(p) - 1).max(dim=0)  # first best on ties
            out.append(Match(self.entries[int(which)], int(n)) if n >= min_length else None)
        return out

    def end_call(self, matches: list[Match | None], new: list[KVEntry]) -> None:
        """Age the kept rows after a call, drop the continued and the long idle, add ``new``."""
        continued = {id(m.entry) for m in matches if m and m.length == len(m.entry.tokens)}
        kept = []
        for e in self.entries:
            e.idle += 1
            if id(e) not in continued and e.idle < self.keep_calls:
                kept.append(e)
        self.entries = kept + new


def weights_fingerprint(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Storage address and in-place version of every parameter: changes when any weight does."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def reuse_unsupported(model: Any) -> str | None:
    """Why kept KV cannot be spliced for this model (``None`` when it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    try:
        cache = DynamicCache(config=config)
    except Exception as e:  # noqa: BLE001 - any failure means: no reuse
        return f"DynamicCache(config=...) failed: {e}"
    odd = sorted({type(x).__name__ for x in cache.layers if type(x) is not DynamicLayer})
    return f"cache layers of type {', '.join(odd)}" if odd else None


def batch_layout(
    past_lengths: list[int], new_tokens: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids (b, S), attention mask (b, P + S) and position ids (b, S) of a batch whose row
    ``i`` has a past of ``past_lengths[i]`` tokens (left-padded to ``P``) and the new tokens
    ``new_tokens[i]`` (left-padded to ``S``).

    >>> ids, mask, pos = batch_layout([2, 0], [[7], [8, 9]], pad_id=0)
    >>> ids.tolist(), mask.tolist(), pos.tolist()
    ([[0, 7], [8, 9]], [[1, 1, 0, 1], [0, 0, 1, 1]], [[1, 2], [0, 1]])
    """
    b, width_p, width_s = len(new_tokens), max(past_lengths), max(len(t) for t in new_tokens)
    ids = torch.full((b, width_s), pad_id, dtype=torch.long)  # (b, S)
    mask = torch.zeros((b, width_p + width_s), dtype=torch.long)  # (b, P + S)
    for i, (n, toks) in enumerate(zip(past_lengths, new_tokens)):
        ids[i, width_s - len(toks) :] = torch.tensor(toks, dtype=torch.long)
        mask[i, width_p - n : width_p] = 1
        mask[i, width_p + width_s - len(toks) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)[:, width_p:]  # (b, S): real tokens only
    return ids, mask, positions


def past_cache(config: Any, pasts: list[torch.Tensor | None]) -> Any:
    """A ``DynamicCache`` holding each row's past (layers, 2, H, n_i, D), left-padded to the
    longest (pad slots are zeros; the attention mask of :func:`batch_layout` hides them)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    ref = next((p for p in pasts if p is not None and p.shape[-2] > 0), None)
    if ref is None:
        return cache
    layers, _, heads, _, dim = ref.shape
    width = max(p.shape[-2] for p in pasts if p is not None)
    past = ref.new_empty((layers, 2, len(pasts), heads, width, dim))  # (layers, 2, b, H, P, D)
    for i, p in enumerate(pasts):
        n = 0 if p is None else p.shape[-2]
        past[:, :, i, :, : width - n] = 0  # finite pads: masked, but 0 * NaN would leak
        if n:
            past[:, :, i, :, width - n :] = p
    for index in range(layers):
        _fill_layer(cache, index, past[index, 0], past[index, 1])  # (b, H, P, D) each
    return cache


def _fill_layer(cache: Any, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make layer ``index`` of an empty ``cache`` hold ``keys``/``values`` (b, H, W, D)."""
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[index] if index < len(cache.layers) else None
    if type(layer) is DynamicLayer:  # no copy: the next update concatenates anyway
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    else:  # layers created lazily: the public way (one copy)
        cache.update(keys, values, index)


def length_buckets(lengths: list[int], overhead: int, max_blocks: int = 64) -> list[list[int]]:
    """Split rows into groups of similar lengths, each run as its own padded batch: minimises
    ``sum(rows * longest) + overhead * groups`` (padded tokens plus a per-forward cost in tokens)
    over splits of the rows sorted by length (in at most ``max_blocks`` equal blocks).

    >>> length_buckets([200, 3, 190, 5, 4], overhead=20)
    [[1, 3, 4], [0, 2]]
    >>> length_buckets([200, 3, 190], overhead=1000)
    [[0, 1, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    step = -(-len(order) // max_blocks)
    bounds = list(range(0, len(order), step)) + [len(order)]
    best, cut = [0] + [None] * (len(bounds) - 1), [0] * len(bounds)
    for j in range(1, len(bounds)):
        longest = lengths[order[bounds[j] - 1]]
        for i in range(j):
            cost = best[i] + (bounds[j] - bounds[i]) * longest + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(bounds) - 1
    while j > 0:
        groups.append(sorted(order[bounds[cut[j]] : bounds[j]]))
        j = cut[j]
    return groups[::-1]


def merge_caches(config: Any, parts: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """One cache and attention mask (b, W) from the caches of consecutive row groups, each part
    being ``(cache, attention (b_g, W_g))``: rows in part order, right-aligned (left pads of
    zeros, masked). Only for plain ``DynamicLayer`` caches."""
    from transformers import DynamicCache

    width = max(att.shape[1] for _, att in parts)

    def stitch(pieces: list[torch.Tensor]) -> torch.Tensor:
        """Pieces (b_g, ..., W_g, E) -> (b, ..., W, E), each left-padded with zeros."""
        ref = pieces[0]
        rows = sum(p.shape[0] for p in pieces)
        out = ref.new_empty((rows, *ref.shape[1:-2], width, ref.shape[-1]))  # (b, ..., W, E)
        at = 0
        for piece in pieces:  # contiguous slices: plain copies
            rows, w = piece.shape[0], piece.shape[-2]
            out[at : at + rows, ..., : width - w, :] = 0
            out[at : at + rows, ..., width - w :, :] = piece
            at += rows
        return out

    attention = stitch([att[..., None] for _, att in parts])[..., 0]  # (b, W)
    cache = DynamicCache(config=config)
    for n in range(len(parts[0][0].layers)):
        keys = stitch([part.layers[n].keys for part, _ in parts])  # (b, H, W, D)
        values = stitch([part.layers[n].values for part, _ in parts])  # (b, H, W, D)
        _fill_layer(cache, n, keys, values)
    return cache, attention


def row_kv(cache: Any, mask_row: torch.Tensor, j: int) -> torch.Tensor:
    """Row ``j``'s keys/values at its real columns (``mask_row`` (W,) == 1): (layers, 2, H, n, D)"""
    cols = mask_row.nonzero().squeeze(-1)  # (n,)
    return torch.stack(
        [torch.stack((layer.keys[j][:, cols], layer.values[j][:, cols])) for layer in cache.layers]
    )


def shared_groups(
    prompts: list[list[int]], starts: list[int], bases: list[int], min_shared: int
) -> list[tuple[list[int], int]]:
    """Groups of >= 2 rows that start from the same past (``bases[i]`` identifies it, ``starts[i]``
    its length) and share at least ``min_shared`` more tokens, each as ``(rows, end)``: every row
    of the group has the same tokens up to ``end``, and at least one token after it.

    >>> shared_groups([[1, 2, 3, 4], [1, 2, 3, 5], [9, 9]], [0, 0, 0], [0, 0, 0], 2)
    [([0, 1], 3)]
    """
    by_base: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(bases, starts)):
        by_base.setdefault(key, []).append(i)
    groups = []
    for (_, start), rows in by_base.items():
        rows = sorted(rows, key=lambda i: prompts[i][start:])  # sorted: a run's LCP = min adjacent
        run, run_lcp = [rows[0]], 0
        for a, b in zip(rows, rows[1:] + [None]):
            lcp = -1 if b is None else _common(prompts[a], prompts[b], start)
            if lcp >= min_shared:
                run, run_lcp = run + [b], (lcp if len(run) == 1 else min(run_lcp, lcp))
                continue
            if len(run) >= 2:
                groups.append((run, start + run_lcp))
            run, run_lcp = [b], 0
    return groups


def _common(a: list[int], b: list[int], start: int) -> int:
    """Tokens ``a`` and ``b`` share after ``start``, leaving both at least one more token."""
    limit = min(len(a), len(b)) - 1
    n = start
    while n < limit and a[n] == b[n]:
        n += 1
    return n - start


def trim_left(cache: Any, attention: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns no row attends to (left by rows that left the batch) from every
    layer of ``cache`` (views, no copy); return the attention mask (b, W') without them.

    >>> trim_left(None, torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])).tolist()
    [[0, 1, 1], [1, 1, 1]]
    """
    first = int(attention.any(dim=0).int().argmax())  # every row has a real column
    if first == 0:
        return attention
    for layer in getattr(cache, "layers", ()):
        layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
    return attention[:, first:]
