"""chemlit: a language model that writes a chemical rationale, then a melting point."""

from importlib import import_module

__all__ = ["CPTModule", "PPOModule", "RationaleDataModule", "SFTModule", "parse_prediction", "render"]
__version__ = "0.1.0"

# Imported on first use, so light tools (the descriptor workers of chemlit.eval.baselines, the
# table validator) do not pay for torch, Lightning and transformers.
_WHERE = {"CPTModule": "chemlit.stages.cpt", "PPOModule": "chemlit.stages.ppo", "SFTModule": "chemlit.stages.sft",
          "RationaleDataModule": "chemlit.data.datamodule", "parse_prediction": "chemlit.data.prompts",
          "render": "chemlit.data.prompts"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chemlit' has no attribute {name!r}")
