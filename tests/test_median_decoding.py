"""decoding=median: the number is the median of numbers sampled after the model's own answer marker."""

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

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen["input_ids"], seen["kwargs"] = input_ids, kwargs
        continuations = [" 90", " 300", " 120"]  # median 120 for the one row with a marker
        tails = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in continuations]
        w = max(map(len, tails))
        tails = torch.tensor([t + [tokenizer.pad_token_id] * (w - len(t)) for t in tails])
        return torch.cat([input_ids, tails], dim=1)

    monkeypatch.setattr(module.model, "generate", fake_generate)
    values = module.median_numbers(prompt_ids, prompt_mask, out, fallback=[100.0, None])
    assert values == [120.0, None]  # the row without a marker keeps its greedy value
    # the samples continue the model's own rationale, right after its answer marker
    prefix = tokenizer.decode(seen["input_ids"][0])
    assert prefix.endswith(ANSWER_MARKER) and "small." in prefix
    assert seen["input_ids"].size(0) == 3 and seen["kwargs"]["do_sample"] is True
    assert seen["kwargs"]["top_k"] is None and seen["kwargs"]["top_p"] is None
