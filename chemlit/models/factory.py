"""Where models and their tokenizers come from.

Two sources behind one config block (``ModelSpec``):

* ``tiny``       -- a small Llama-style model built from a config, with the SMILES-aware tokenizer
                    trained on the training split (the default: runs on a laptop CPU in minutes);
* ``pretrained`` -- any Hugging Face model directory (a previous stage's export) or hub name.

Loading never runs code from a model directory unless ``trust_remote_code`` is set, and weights
are written as safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from chemlit.data.tokenizer import train_smiles_tokenizer

EXPORT_INFO = "chemlit_export.json"


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

    source: Literal["tiny", "pretrained"] = "tiny"
    """tiny: build from `tiny` and train a tokenizer; pretrained: load `path` (directory or hub name)."""
    path: Optional[str] = None
    """Model directory or hub name for source=pretrained (e.g. the previous stage's export)."""
    tiny: TinyConfig = field(default_factory=TinyConfig)
    """Dimensions for source=tiny."""
    trust_remote_code: bool = False
    """Allow a model directory to run its own Python code. Off unless you trust the directory."""


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


def load_model_and_tokenizer(spec: ModelSpec, corpus: Callable[[], Iterable[str]]) -> tuple[PreTrainedModel, object]:
    """The model and tokenizer a stage starts from. ``corpus`` yields training texts (tiny only)."""
    if spec.source == "tiny":
        tokenizer = train_smiles_tokenizer(corpus(), vocab_size=spec.tiny.vocab_size)
        model = build_tiny(spec.tiny, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                           tokenizer.eos_token_id)
        return model, tokenizer
    if spec.source == "pretrained":
        if not spec.path:
            raise ValueError("model.source=pretrained needs model.path (a model directory or hub name)")
        tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code,
                                                     dtype=torch.float32)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    raise ValueError(f"unknown model source {spec.source!r}")


def export_model(model: PreTrainedModel, tokenizer, directory: str | Path, info: dict) -> Path:
    """Write model (safetensors) + tokenizer + ``chemlit_export.json``, whole or not at all."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
    if directory.exists():
        old = directory.with_name(directory.name + f".old{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory
