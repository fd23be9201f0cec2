"""Decoding and scoring when K rows share one prefix: compute the prefix once, not K times.

PPO samples K answers per molecule, and median decoding samples K numbers after one rationale. In
both, every group of K rows starts with the same tokens. A plain forward pass (and ``generate``)
computes that prefix K times; here it is computed once per group and its key/value cache is
repeated K times. The K continuations then attend to the shared cache. Gradients flow back through
the repeated cache into the prefix's one computation, so the result -- logits, hidden states and
gradients -- equals the plain pass on the K-times repeated rows (``tests/test_shared_prefix.py``
checks this), at a fraction of the cost.

The decoding loop (``decode_after_prefix``) is also what validation, test and predict use for
greedy answers (K = 1). Against ``generate`` on CPU it saves four things, each found by profiling
a PPO rollout: the cache has room for the whole answer from the start (``PreallocatedLayer``; the
default cache copies itself at every token), finished rows leave the batch, a sample costs one
random number per row, not one per vocabulary entry (``sample_from``), and while decoding, the
prefix's keys and values are kept and read once per group, not K times (``attend_after_shared_prefix``,
for model families with plain attention; others get the repeated cache).

Layout, as everywhere in chemlit: prefixes are left-padded, continuations right-padded.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from transformers import AttentionInterface, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with room for the whole decode.

    ``DynamicLayer.update`` appends a token with ``torch.cat``, copying the layer's whole cache at
    every step; on CPU that copying was 45% of a PPO rollout (profiled: 128 rows, 96 new tokens).
    Here a step writes one column in place and ``keys``/``values`` are views of the filled part.
    Only for decoding without gradients (the in-place write would break autograd).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._hold(keys, values, capacity)

    def _hold(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Copy ``keys``/``values`` into fresh buffers of ``capacity`` positions (at least their length)."""
        self.length = keys.size(-2)
        self._keys = keys.new_empty(*keys.shape[:-2], max(capacity, self.length), keys.size(-1))
        self._values = values.new_empty(*values.shape[:-2], max(capacity, self.length), values.size(-1))
        self._keys[..., :self.length, :] = keys
        self._values[..., :self.length, :] = values
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._keys[..., :self.length, :]
        self.values = self._values[..., :self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.size(-2)
        if end > self._keys.size(-2):  # out of room: grow (twice the need, so growing stays rare)
            self._hold(self.keys, self.values, 2 * end)
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.length = self.keys.size(-2)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``; only the filled part is copied (the free room is not)."""
        self._hold(self.keys[indices], self.values[indices], self._keys.size(-2))


def with_room(cache, repeats: int, new_tokens: int):
    """The prefix's cache repeated ``repeats`` times, each plain dynamic layer moved into a buffer with
    room for ``new_tokens`` more (other layer kinds, e.g. sliding windows, are left as they are)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            cache.layers[i] = PreallocatedLayer(layer.keys.repeat_interleave(repeats, dim=0),
                                                layer.values.repeat_interleave(repeats, dim=0),
                                                layer.keys.size(-2) + new_tokens)
        else:
            layer.batch_repeat_interleave(repeats)
    return cache


def own_tokens_cache(cache, rows: int, new_tokens: int):
    """``cache`` emptied to ``rows`` rows of no tokens, each plain layer with room for ``new_tokens``."""
    for i, layer in enumerate(cache.layers):
        empty = layer.keys.new_empty(rows, *layer.keys.shape[1:-2], 0, layer.keys.size(-1))
        cache.layers[i] = PreallocatedLayer(empty, empty.clone(), new_tokens)
    return cache


def draw_uniforms(rows: int, max_new_tokens: int, device) -> torch.Tensor:
    """(rows, max_new_tokens) uniform numbers, one per row and step, drawn before decoding starts.

    Both decoding paths (the fast loop here and plain ``generate``) draw them the same way and pick
    token t of row b with ``uniforms[b, t]``, so from the same random state they write the same
    tokens, whichever rows have already finished.
    """
    return torch.rand(rows, max_new_tokens, dtype=torch.float64, device=device)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from ``probs`` (A, V) by inverting its cumulative distribution at ``uniforms`` (A,).

    Exact sampling with one uniform number per row; ``torch.multinomial`` draws one random number
    per vocabulary entry (131k per step for 128 rows, ~9% of a rollout). The cumulative sum is
    taken in float64 so rounding cannot move mass between tokens of a large vocabulary.
    """
    cdf = probs.double().cumsum(dim=-1)                                      # (A, V)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]                        # (A, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.size(-1) - 1)


# ---------------------------------------------------------------- attention over a shared prefix
SHARED_PREFIX_ATTENTION = "chemlit_shared_prefix"
# Families whose attention is plain softmax(q k^T * scale) v over every earlier token (no sliding window,
# sinks, soft-capping or position bias): for them ``attend_after_shared_prefix`` computes exactly it.
PLAIN_ATTENTION_MODELS = ("llama", "qwen2", "qwen3")


def attend_after_shared_prefix(query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                               prefix_bias: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group_size: int,
                               scaling: float, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decoding step's attention for rows that continue their group's shared prefix ("cascade").

    query (A, Hq, 1, D): the newest token of the A rows still writing; prefix_keys/values
    (G, Hkv, P, D): each group's prefix, once; prefix_bias (G, P): 0 on prefix tokens, -inf on its
    left padding; keys/values (A, Hkv, t, D): each row's own tokens so far; slots (A,): row a is
    sample ``slots[a] % K`` of group ``slots[a] // K`` (None: all G*K rows, in order).
    -> (A, 1, Hq, D), the layout the model's attention functions return.

    The same softmax over [prefix, own tokens] as plain attention over the K-times repeated cache,
    but the prefix's keys and values are read once per group, not once per row: decoding attention
    on CPU is bound by reading the cache from memory (profiled: 41% of a PPO rollout). A group's K
    rows (and the Hq / Hkv query heads that share a key head) form one matrix product against their
    prefix; a row that has left the batch leaves a zero query in its slot.
    """
    A, Hq, _, D = query.shape
    G, Hkv, P, _ = prefix_keys.shape
    K, r, t = group_size, Hq // Hkv, keys.size(-2)
    q = query.reshape(A, Hkv, r, D)                # query head h uses key head h // r

    def to_groups(x: torch.Tensor) -> torch.Tensor:   # (A, Hkv, r, n) -> (G, Hkv, K*r, n)
        if slots is not None:
            grid = x.new_zeros(G * K, Hkv, r, x.size(-1))
            grid[slots] = x
            x = grid
        return x.view(G, K, Hkv, r, -1).transpose(1, 2).reshape(G, Hkv, K * r, -1)

    def to_rows(x: torch.Tensor) -> torch.Tensor:     # (G, Hkv, K*r, n) -> (A, Hkv, r, n)
        x = x.view(G, Hkv, K, r, -1).transpose(1, 2).reshape(G * K, Hkv, r, -1)
        return x if slots is None else x[slots]

    prefix_scores = to_rows((to_groups(q) @ prefix_keys.transpose(-1, -2)) * scaling
                            + prefix_bias[:, None, None, :])                    # (A, Hkv, r, P)
    own_scores = (q @ keys.transpose(-1, -2)) * scaling                          # (A, Hkv, r, t)
    weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1), dim=-1, dtype=torch.float32)
    prefix_weights, own_weights = weights.to(values.dtype).split([P, t], dim=-1)
    out = to_rows(to_groups(prefix_weights) @ prefix_values) + own_weights @ values   # (A, Hkv, r, D)
    return out.reshape(A, 1, Hq, D)


class SharedPrefix:
    """What rows after a shared prefix attend to besides their own tokens: every layer's prefix
    keys/values (G, Hkv, P, D), the prefix padding as a bias, and which rows are still there."""

    def __init__(self, prefix_cache, prefix_mask: torch.Tensor, group_size: int):
        self.keys = [layer.keys for layer in prefix_cache.layers]
        self.values = [layer.values for layer in prefix_cache.layers]
        self.bias = torch.zeros(prefix_mask.shape, dtype=self.keys[0].dtype, device=prefix_mask.device)
        self.bias = self.bias.masked_fill(prefix_mask == 0, float("-inf"))    # (G, P)
        self.group_size = group_size
        self.slots: Optional[torch.Tensor] = None  # None: all G*K rows, in order

    def select(self, keep: torch.Tensor) -> None:
        """Only rows ``keep`` (of those still there) go on."""
        self.slots = keep if self.slots is None else self.slots[keep]

    def attend(self, layer: int, query, keys, values, scaling: float) -> torch.Tensor:
        return attend_after_shared_prefix(query, self.keys[layer], self.values[layer], self.bias, keys, values,
                                          self.group_size, scaling, self.slots)


def _shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, shared_prefix: Optional[SharedPrefix] = None, **kwargs):
    """The attention function registered as ``SHARED_PREFIX_ATTENTION`` (transformers' AttentionInterface):
    the decoding loop passes ``shared_prefix`` to the model, which hands it to every attention layer.
    A call without it (none in chemlit) gets the standard sdpa attention."""
    if shared_prefix is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.size(-1) ** -0.5
    return shared_prefix.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)


def can_share_prefix_attention(model) -> bool:
    """Whether ``model`` computes plain attention in every layer, so the shared-prefix attention may stand in."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (getattr(config, "model_type", None) in PLAIN_ATTENTION_MODELS
            and all(kind == "full_attention" for kind in layer_types)
            and not getattr(config, "use_sliding_window", False))


@contextmanager
def attention_implementation(model, name: str):
    """Run ``model`` with the attention function ``name`` inside the block, its own outside it."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (left padding gets 0).  (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def forward_with_shared_prefix(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                               continuation_ids: torch.Tensor, continuation_mask: torch.Tensor, repeats: int,
                               with_hidden: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits (and last hidden states) that predict each continuation token.

    prefix_ids, prefix_mask: (G, P), one row per group; continuation_ids, continuation_mask: (G*K, T),
    the K continuations of group g in rows g*K .. g*K+K-1. Returns logits (G*K, T, V) and hidden
    states (G*K, T, H) at positions P-1 .. P+T-2 of the joined sequence -- position t's output
    predicts token t+1, so row t of the result predicts continuation token t.
    ``forward_plain`` computes the same with one ordinary forward pass over the K-times repeated rows.
    """
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions(prefix_mask),
                use_cache=True, output_hidden_states=with_hidden, logits_to_keep=1)  # only the last predicts
    cache = out.cache
    cache.batch_repeat_interleave(repeats)                                   # (G*K, heads, P, d) per layer
    first_logits = out.logits[:, -1:].repeat_interleave(repeats, dim=0)      # (G*K, 1, V)
    first_hidden = out.hidden_states[-1][:, -1:].repeat_interleave(repeats, dim=0) if with_hidden else None
    if continuation_ids.size(1) == 1:  # nothing after the first token needs predicting
        return first_logits, first_hidden
    mask = torch.cat([prefix_mask.repeat_interleave(repeats, dim=0), continuation_mask], dim=1)  # (G*K, P+T)
    P = prefix_ids.size(1)
    rest = model(input_ids=continuation_ids[:, :-1], attention_mask=mask[:, :-1],
                 position_ids=positions(mask)[:, P:-1], cache=cache, use_cache=True,
                 output_hidden_states=with_hidden)
    logits = torch.cat([first_logits, rest.logits], dim=1)                   # (G*K, T, V)
    hidden = torch.cat([first_hidden, rest.hidden_states[-1]], dim=1) if with_hidden else None
    return logits, hidden


def forward_plain(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, continuation_ids: torch.Tensor,
                  continuation_mask: torch.Tensor, repeats: int, with_hidden: bool = False
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What ``forward_with_shared_prefix`` returns, from one plain forward pass over [prefix, continuation]
    with each prefix repeated K times: nothing clever, for reading in a debugger."""
    P, T = prefix_ids.size(1), continuation_ids.size(1)
    input_ids = torch.cat([prefix_ids.repeat_interleave(repeats, dim=0), continuation_ids], dim=1)    # (G*K, P+T)
    mask = torch.cat([prefix_mask.repeat_interleave(repeats, dim=0), continuation_mask], dim=1)       # (G*K, P+T)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                output_hidden_states=with_hidden)
    logits = out.logits[:, P - 1:P + T - 1]                                  # (G*K, T, V): position t predicts t+1
    hidden = out.hidden_states[-1][:, P - 1:P + T - 1] if with_hidden else None
    return logits, hidden


@torch.no_grad()
def decode_after_prefix(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, repeats: int,
                        max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                        temperature: Optional[float] = 1.0) -> torch.Tensor:
    """K continuations per prefix from the model's cached decoding loop.  -> (G*K, T) token ids.

    ``temperature=None`` (or 0) is greedy; otherwise each token is drawn from
    softmax(logits / temperature) -- plain sampling, no top-k, no top-p, whatever the model's
    generation_config says, at the pre-drawn uniform of its row and step (``draw_uniforms``). Rows
    that have written the end token leave the batch (with their cache rows) once a quarter of it has
    ended -- in bulk, because dropping rows copies the cache -- so a long answer does not make every
    finished row pay for its extra steps. After the end token a row holds ``pad_token_id``; T is the
    longest continuation written. The cache has room for all ``max_new_tokens`` from the start
    (``PreallocatedLayer``): a step writes one column, not a copy. With K > 1 it holds only each
    row's own tokens; the prefix's stay once per group (``SharedPrefix``).
    ``generate_plain`` writes the same tokens with ``model.generate``.
    """
    rows = prefix_ids.size(0) * repeats
    uniforms = draw_uniforms(rows, max_new_tokens, prefix_ids.device) if temperature else None
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions(prefix_mask),
                use_cache=True, logits_to_keep=1)
    # Several rows per prefix and plain attention: the prefix's cache stays one copy per group and each
    # row's cache holds its own tokens (attend_after_shared_prefix). Otherwise the cache is repeated.
    shared = SharedPrefix(out.cache, prefix_mask, repeats) if repeats > 1 and can_share_prefix_attention(model) else None
    if shared is not None:
        cache = own_tokens_cache(out.cache, rows, max_new_tokens)
        attention, mask = attention_implementation(model, SHARED_PREFIX_ATTENTION), None
    else:
        cache = with_room(out.cache, repeats, max_new_tokens)
        attention, mask = nullcontext(), prefix_mask.repeat_interleave(repeats, dim=0).long()  # (A, P + t)
    logits = out.logits[:, -1].repeat_interleave(repeats, dim=0)              # (A, V), A = rows still writing
    next_position = prefix_mask.sum(dim=1).repeat_interleave(repeats)        # (A,)
    active = torch.arange(rows, device=logits.device)                         # which output row each is
    live = torch.ones(rows, dtype=torch.bool, device=logits.device)          # (A,) not yet ended
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=logits.device)
    length = 0
    with attention:
        for step in range(max_new_tokens):
            if temperature:
                token = sample_from(torch.softmax(logits.float() / temperature, dim=-1), uniforms[active, step])  # (A,)
            else:
                token = logits.argmax(dim=-1)                                 # (A,)
            written = active[live]                                            # output rows written this step
            tokens[written, step] = token[live]
            length = step + 1
            live = live & (token != eos_token_id)
            if step + 1 == max_new_tokens or not live.any():
                break
            if 4 * int((~live).sum()) >= live.numel():  # a quarter has ended: drop those rows and their cache
                keep = live.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                if shared is not None:
                    shared.select(keep)
                else:
                    mask = mask[keep]
                active, token, next_position, live = active[keep], token[keep], next_position[keep], live[keep]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                        cache=cache, use_cache=True, **({"shared_prefix": shared} if shared is not None else {}))
            logits = out.logits[:, -1]
            next_position = next_position + 1
    return tokens[:, :length]


class InverseCDFSampling(LogitsProcessor):
    """Makes ``generate`` pick each token as ``decode_after_prefix`` does: the inverse CDF of
    softmax(scores / temperature) at the row's pre-drawn uniform for this step. It returns 0 for that
    token and -inf elsewhere, so greedy selection then takes it."""

    def __init__(self, uniforms: torch.Tensor, temperature: float, prompt_length: int):
        self.uniforms, self.temperature, self.prompt_length = uniforms, temperature, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.size(1) - self.prompt_length
        token = sample_from(torch.softmax(scores.float() / self.temperature, dim=-1), self.uniforms[:, step])
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


@torch.no_grad()
def generate_plain(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, repeats: int,
                   max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                   temperature: Optional[float] = 1.0) -> torch.Tensor:
    """``decode_after_prefix`` done by ``model.generate`` on the K-times repeated prefixes: the same tokens
    (same uniforms, same inverse-CDF pick), none of the machinery. -> (G*K, T) token ids."""
    rows = prefix_ids.size(0) * repeats
    uniforms = draw_uniforms(rows, max_new_tokens, prefix_ids.device) if temperature else None
    input_ids = prefix_ids.repeat_interleave(repeats, dim=0)                  # (G*K, P)
    processors = LogitsProcessorList([InverseCDFSampling(uniforms, temperature, input_ids.size(1))] if temperature else [])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    sequences = model.generate(input_ids=input_ids, attention_mask=prefix_mask.repeat_interleave(repeats, dim=0),
                               generation_config=config, logits_processor=processors)
    return sequences[:, input_ids.size(1):]
