"""The machine line every bench record carries (report, ablations, throughput)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.system()}")
