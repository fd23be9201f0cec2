"""The machine line every bench record carries (report, ablations, throughput)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.system()}")


def cpu_description() -> str:
    """The machine as the ratio depends on it: the bench report's machine line, the vector ISA torch uses, bf16 units."""
    from chemlit.hardware import cpu_facts

    facts = cpu_facts()
    return f"{machine()}, {facts.aten_capability}, {'with' if facts.has_bf16_units else 'no'} bf16 units, fp32"
