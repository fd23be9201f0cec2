"""decoding=median: the number is the median of numbers sampled after the model's own answer marker."""

import math

import pytest
import torch

from chemlit.data.prompts import ANSWER_MARKER
from chemlit.data.tokenizer import train_smiles_tokenizer
from chemlit.models.factory import TinyConfig, build_tiny
from chemlit.stages.sft import SFTModule


def test_median_of_sampled_numbers_after_the_marker(monkeypatch):
    tokenizer = train_smiles_tokenizer(["Molecule: CCO\nRationale: small.\n##Prediction: 123"] * 10, vocab_size=300)
    module = SFTModule(decoding="median", answer_samples=3)
    module.tokenizer = tokenizer
    module.model = build_tiny(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                              len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    prompt = tokenizer.encode("Molecule: CCO\nRationale:")
    prompt_ids = torch.tensor([prompt, prompt])
    prompt_mask = torch.ones_like(prompt_ids)
    answer = tokenizer.encode(" small.\n##Prediction: 100") + [tokenizer.eos_token_id]
    no_marker = tokenizer.encode(" small, no answer") + [tokenizer.eos_token_id]
    width = max(len(answer), len(no_marker))
    out = torch.tensor([prompt + answer + [tokenizer.pad_token_id] * (width - len(answer)),
                        prompt + no_marker + [tokenizer.pad_token_id] * (width - len(no_marker))])
    seen = {}

    def fake_decode(model, prefix_ids, prefix_mask, repeats, max_new_tokens, eos_token_id, pad_token_id,
                    temperature):
        seen.update(prefix_ids=prefix_ids, repeats=repeats, temperature=temperature)
        continuations = [" 90", " 300", " 120"]  # median 120 for the one row with a marker
        tails = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in continuations]
        w = max(map(len, tails))
        return torch.tensor([t + [tokenizer.pad_token_id] * (w - len(t)) for t in tails])

    monkeypatch.setattr("chemlit.stages.base.decode_after_prefix", fake_decode)
    values, intervals = module.median_numbers(prompt_ids, prompt_mask, out, fallback=[100.0, None])
    assert values == [120.0, None]  # the row without a marker keeps its greedy value
    # the 10th-90th percentile of the samples 90, 300, 120 (linear interpolation); none without samples
    assert intervals[0] == pytest.approx((90 + 0.2 * 30, 120 + 0.8 * 180))
    assert all(math.isnan(x) for x in intervals[1])
    # the samples continue the model's own rationale, right after its answer marker: one prefix, 3 samples
    prefix = tokenizer.decode(seen["prefix_ids"][0])
    assert prefix.endswith(ANSWER_MARKER) and "small." in prefix
    assert seen["prefix_ids"].size(0) == 1 and seen["repeats"] == 3
    assert seen["temperature"] == module.temperature  # plain sampling at the configured temperature
