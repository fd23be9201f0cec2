"""chemlit: a language model that writes a chemical rationale, then a melting point."""

from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.prompts import parse_prediction, render
from chemlit.stages.cpt import CPTModule
from chemlit.stages.ppo import PPOModule
from chemlit.stages.sft import SFTModule

__all__ = ["CPTModule", "PPOModule", "RationaleDataModule", "SFTModule", "parse_prediction", "render"]
__version__ = "0.1.0"
