"""A prefix computed once for K rows gives the same numbers as the K repeated rows, and the cached
decoding loop writes what ``generate`` writes (greedy) or samples from softmax(logits / T)."""

import pytest
import torch

from chemlit.models.factory import TinyConfig, build_tiny
from chemlit.models.shared_prefix import decode_after_prefix, forward_with_shared_prefix, positions

PAD, BOS, EOS = 0, 1, 2


def tiny_model(vocab: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny(TinyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=vocab),
                      vocab, PAD, BOS, EOS).eval()


def left_padded_prefixes():
    ids = torch.randint(3, 60, (3, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = PAD, 0  # a shorter prompt, left-padded
    return ids, mask


def test_shared_prefix_forward_equals_the_repeated_rows_in_values_and_gradients():
    model = tiny_model()
    K, (prefix, prefix_mask) = 4, left_padded_prefixes()
    continuation = torch.randint(3, 60, (3 * K, 5))
    continuation_mask = torch.ones_like(continuation)
    continuation[1, 3:], continuation_mask[1, 3:] = PAD, 0  # a response that ended early
    live = continuation_mask.bool()

    logits, hidden = forward_with_shared_prefix(model, prefix, prefix_mask, continuation, continuation_mask, K,
                                                with_hidden=True)
    shared_loss = (logits.log_softmax(-1).gather(-1, continuation[..., None]).squeeze(-1) * live).sum() + hidden[live].sum()
    shared_grads = torch.autograd.grad(shared_loss, list(model.parameters()))

    sequences = torch.cat([prefix.repeat_interleave(K, 0), continuation], 1)
    mask = torch.cat([prefix_mask.repeat_interleave(K, 0), continuation_mask], 1)
    out = model(input_ids=sequences, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
    P = prefix.size(1)
    plain_logits, plain_hidden = out.logits[:, P - 1:-1], out.hidden_states[-1][:, P - 1:-1]
    plain_loss = (plain_logits.log_softmax(-1).gather(-1, continuation[..., None]).squeeze(-1) * live).sum() \
        + plain_hidden[live].sum()
    plain_grads = torch.autograd.grad(plain_loss, list(model.parameters()))

    assert logits.shape == (3 * K, 5, 60) and hidden.shape == (3 * K, 5, 32)
    torch.testing.assert_close(logits[live], plain_logits[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[live], plain_hidden[live], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(shared_grads, plain_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4)  # float sums in another order


def test_greedy_decoding_matches_generate_when_rows_end_at_different_steps():
    model = tiny_model()
    prefix, prefix_mask = left_padded_prefixes()
    kwargs = dict(input_ids=prefix, attention_mask=prefix_mask, max_new_tokens=10, do_sample=False, top_k=None,
                  top_p=None, temperature=None, pad_token_id=PAD)
    free = model.generate(**kwargs, eos_token_id=-1)[:, prefix.size(1):]   # (3, 10): no row stops
    eos = int(free[0, 2])  # call the token row 0 writes third "the end": rows now stop at different steps
    expected = model.generate(**kwargs, eos_token_id=eos)[:, prefix.size(1):]
    mine = decode_after_prefix(model, prefix, prefix_mask, 1, 10, eos, PAD, temperature=None)
    ends = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in mine]
    assert len(set(ends)) > 1  # the test is only worth something if rows really end apart
    assert torch.equal(mine, expected[:, :mine.size(1)])
    assert (expected[:, mine.size(1):] == PAD).all()  # generate only padded after the longest row


def test_sampling_draws_from_softmax_of_logits_over_temperature_without_truncation():
    model = tiny_model()
    model.generation_config.top_k = 5      # a hub model's generation_config must not truncate our sampling
    model.generation_config.top_p = 0.5
    prefix = torch.tensor([[BOS, 7, 8, 9]])
    torch.manual_seed(1)
    first = decode_after_prefix(model, prefix, torch.ones_like(prefix), 4000, 1, EOS, PAD, temperature=0.7)[:, 0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=prefix).logits[0, -1] / 0.7, dim=-1)
    frequencies = torch.bincount(first, minlength=probs.numel()).float() / first.numel()
    assert (frequencies - probs).abs().max() < 0.03
    assert (frequencies > 0).sum() > 5  # more than top-k=5 distinct tokens were drawn


def test_plain_generate_writes_the_same_tokens_and_forward_plain_the_same_logprobs():
    """The debugging path (plain ``generate`` + one ordinary forward) against the fast path (cached loop,
    rows leaving, shared prefix), from the same random state: same tokens, same log-probs (fp32)."""
    from chemlit.models.shared_prefix import forward_plain, generate_plain

    model = tiny_model()
    model.generation_config.top_k = 5      # what a hub model may carry: neither path may truncate the sampling
    model.generation_config.top_p = 0.5
    prefix, prefix_mask = left_padded_prefixes()
    torch.manual_seed(3)
    free = decode_after_prefix(model, prefix, prefix_mask, 3, 8, -1, PAD, temperature=0.8)
    eos = int(free[0, 2])  # a token that makes rows end at different steps
    torch.manual_seed(3)
    fast = decode_after_prefix(model, prefix, prefix_mask, 3, 8, eos, PAD, temperature=0.8)
    torch.manual_seed(3)
    plain = generate_plain(model, prefix, prefix_mask, 3, 8, eos, PAD, temperature=0.8)
    ends = {(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in fast}
    assert len(ends) > 1
    assert torch.equal(fast, plain[:, :fast.size(1)]) and (plain[:, fast.size(1):] == PAD).all()
    written = (torch.cumsum((fast == eos).long(), 1) - (fast == eos).long() == 0).long()  # up to the end token
    with torch.no_grad():
        fast_logits, fast_hidden = forward_with_shared_prefix(model, prefix, prefix_mask, fast, written, 3, True)
        plain_logits, plain_hidden = forward_plain(model, prefix, prefix_mask, fast, written, 3, True)
    live = written.bool()
    fast_lp = torch.log_softmax(fast_logits, -1).gather(-1, fast[..., None]).squeeze(-1)
    plain_lp = torch.log_softmax(plain_logits, -1).gather(-1, fast[..., None]).squeeze(-1)
    torch.testing.assert_close(fast_lp[live], plain_lp[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_hidden[live], plain_hidden[live], rtol=1e-5, atol=1e-5)


def test_preallocated_cache_layer_holds_what_a_growing_layer_holds_through_repeat_select_and_growth():
    from transformers.cache_utils import DynamicLayer

    from chemlit.models.shared_prefix import PreallocatedLayer

    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    plain = DynamicLayer()
    plain.update(keys, values)
    room = PreallocatedLayer(keys, values, capacity=6)  # room for 2 more: the 3rd step must grow it
    for layer in (plain, room):
        layer.batch_repeat_interleave(3)                # (6, 3, 4, 5)
    for step in range(4):
        new_k, new_v = torch.randn(6 if step < 2 else 4, 3, 1, 5), torch.randn(6 if step < 2 else 4, 3, 1, 5)
        if step == 2:                                   # two rows end
            for layer in (plain, room):
                layer.batch_select_indices(torch.tensor([0, 2, 3, 5]))
        k1, v1 = plain.update(new_k, new_v)
        k2, v2 = room.update(new_k, new_v)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert room.get_seq_length() == plain.get_seq_length() == 5 + step
    assert room._keys.size(-2) >= 8  # it grew past its first capacity


def test_inverse_cdf_sampler_never_draws_a_zero_probability_token():
    from chemlit.models.shared_prefix import sample_from

    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]]).repeat(2000, 1)
    drawn = sample_from(probs, torch.rand(probs.size(0), dtype=torch.float64)).view(2000, 3)
    assert set(drawn[:, 0].tolist()) == {1, 3} and (drawn[:, 1] == 3).all()
    counts = torch.bincount(drawn[:, 2], minlength=4).float() / 2000
    assert (counts - 0.25).abs().max() < 0.04


def small_model(model_type: str, seed: int = 0, **extra):
    """A 2-layer model of a given family with grouped-query attention (4 query heads, 2 key heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=60, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_shared_prefix_attention_decodes_what_the_repeated_cache_decodes(model_type, monkeypatch):
    """Sampling with the prefix's cache kept once per group (attend_after_shared_prefix) writes the
    same tokens, and computes the same logits at every step, as with the cache repeated K times,
    while rows of the same group end at different steps and leave the batch."""
    import chemlit.models.shared_prefix as shared_prefix

    model = small_model(model_type)
    prefix, prefix_mask = left_padded_prefixes()
    implementation = model.config._attn_implementation
    rows_seen = []  # the rows (slots) of every shared-prefix attention call
    attend = shared_prefix.SharedPrefix.attend

    def spy(self, *args):
        rows_seen.append(self.slots)
        return attend(self, *args)

    monkeypatch.setattr(shared_prefix.SharedPrefix, "attend", spy)

    def decode(eos: int, share: bool):
        monkeypatch.setattr(shared_prefix, "can_share_prefix_attention", lambda m: share)
        logits = []  # what the model predicts at every decoding step, for the rows still writing
        hook = model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[:, -1].clone()))
        torch.manual_seed(5)
        tokens = decode_after_prefix(model, prefix, prefix_mask, 4, 12, eos, PAD, temperature=1.5)
        hook.remove()
        return tokens, logits

    free = decode(-1, share=False)[0]                    # no row ends: find a token that ends rows apart
    eos = int(free[0, 2])
    plain = decode(eos, share=False)
    assert not rows_seen
    mine = decode(eos, share=True)
    ends = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in mine[0]]
    assert len(set(ends)) > 2                            # rows ended apart ...
    assert rows_seen[0] is None and rows_seen[-1] is not None  # ... and some left the batch mid-decoding
    assert torch.equal(mine[0], plain[0])
    assert len(mine[1]) == len(plain[1]) > 5
    for step, (a, b) in enumerate(zip(mine[1], plain[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert model.config._attn_implementation == implementation  # switched back after the loop


def test_shared_prefix_attention_only_stands_in_for_plain_full_attention():
    from chemlit.models.shared_prefix import can_share_prefix_attention

    assert can_share_prefix_attention(small_model("llama"))
    assert not can_share_prefix_attention(small_model("qwen2", use_sliding_window=True, sliding_window=4,
                                                      max_window_layers=0))
    assert not can_share_prefix_attention(small_model("gemma2"))  # soft-capping, sliding layers
