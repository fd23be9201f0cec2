"""Decoding and scoring when K rows share one prefix: compute the prefix once, not K times.

PPO samples K answers per molecule, and median decoding samples K numbers after one rationale. In
both, every group of K rows starts with the same tokens. A plain forward pass (and ``generate``)
computes that prefix K times; here it is computed once per group and its key/value cache is
repeated K times (``DynamicCache.batch_repeat_interleave``). The K continuations then attend to the
shared cache. Gradients flow back through the repeated cache into the prefix's one computation,
so the result -- logits, hidden states and gradients -- equals the plain pass on the K-times
repeated rows (``tests/test_shared_prefix.py`` checks this), at a fraction of the cost.

Layout, as everywhere in chemlit: prefixes are left-padded, continuations right-padded.
"""

from __future__ import annotations

from typing import Optional

import torch


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
    """
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions(prefix_mask),
                use_cache=True, output_hidden_states=with_hidden)
    cache = out.past_key_values
    cache.batch_repeat_interleave(repeats)                                   # (G*K, heads, P, d) per layer
    first_logits = out.logits[:, -1:].repeat_interleave(repeats, dim=0)      # (G*K, 1, V)
    first_hidden = out.hidden_states[-1][:, -1:].repeat_interleave(repeats, dim=0) if with_hidden else None
    if continuation_ids.size(1) == 1:  # nothing after the first token needs predicting
        return first_logits, first_hidden
    mask = torch.cat([prefix_mask.repeat_interleave(repeats, dim=0), continuation_mask], dim=1)  # (G*K, P+T)
    P = prefix_ids.size(1)
    rest = model(input_ids=continuation_ids[:, :-1], attention_mask=mask[:, :-1],
                 position_ids=positions(mask)[:, P:-1], past_key_values=cache, use_cache=True,
                 output_hidden_states=with_hidden)
    logits = torch.cat([first_logits, rest.logits], dim=1)                   # (G*K, T, V)
    hidden = torch.cat([first_hidden, rest.hidden_states[-1]], dim=1) if with_hidden else None
    return logits, hidden


@torch.no_grad()
def decode_after_prefix(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, repeats: int,
                        max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                        temperature: Optional[float] = 1.0, with_scores: bool = False):
    """K continuations per prefix from the model's cached decoding loop.  -> (G*K, T) token ids.

    ``temperature=None`` (or 0) is greedy; otherwise each token is drawn from
    softmax(logits / temperature) -- plain sampling, no top-k, no top-p, whatever the model's
    generation_config says. Rows that have written the end token leave the batch (their cache rows
    are dropped), so a long answer does not make every finished row pay for its extra steps. After the
    end token a row holds ``pad_token_id``; T is the longest continuation written.

    ``with_scores=True`` also returns what the loop computed anyway for each written token: its
    log-probability under softmax(logits / temperature) (G*K, T) and the last hidden state that
    predicted it (G*K, T, H) -- PPO's old log-probs and its critic's input, without another forward
    pass. Both are 0 after a row's end.
    """
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions(prefix_mask),
                use_cache=True, output_hidden_states=with_scores)
    cache = out.past_key_values
    cache.batch_repeat_interleave(repeats)
    logits = out.logits[:, -1].repeat_interleave(repeats, dim=0)              # (A, V), A = rows still writing
    hidden = out.hidden_states[-1][:, -1].repeat_interleave(repeats, dim=0) if with_scores else None  # (A, H)
    mask = prefix_mask.repeat_interleave(repeats, dim=0).long()               # (A, P + t)
    next_position = mask.sum(dim=1)                                           # (A,)
    rows = logits.size(0)
    active = torch.arange(rows, device=logits.device)                         # which output row each is
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=logits.device)
    if with_scores:
        logprobs = torch.zeros(rows, max_new_tokens, device=logits.device)
        hiddens = torch.zeros(rows, max_new_tokens, hidden.size(-1), dtype=hidden.dtype, device=logits.device)
    length = 0
    for step in range(max_new_tokens):
        scaled = logits.float() / (temperature or 1.0)
        if temperature:
            token = torch.multinomial(torch.softmax(scaled, dim=-1), num_samples=1).squeeze(1)  # (A,)
        else:
            token = logits.argmax(dim=-1)
        tokens[active, step] = token
        if with_scores:
            logprobs[active, step] = torch.log_softmax(scaled, dim=-1).gather(1, token[:, None]).squeeze(1)
            hiddens[active, step] = hidden
        length = step + 1
        writing = token != eos_token_id
        if step + 1 == max_new_tokens or not writing.any():
            break
        if not writing.all():  # drop the rows that just ended, from the batch and from the cache
            keep = writing.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, token, mask, next_position = active[keep], token[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                    past_key_values=cache, use_cache=True, output_hidden_states=with_scores)
        logits = out.logits[:, -1]
        hidden = out.hidden_states[-1][:, -1] if with_scores else None
        next_position = next_position + 1
    if with_scores:
        return tokens[:, :length], logprobs[:, :length], hiddens[:, :length]
    return tokens[:, :length]
