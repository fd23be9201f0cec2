"""What this machine runs fast: the precision ``auto`` picks, and how many cores training uses.

``trainer.precision: auto`` (the default of every stage and of the pipeline) becomes

* ``bf16-mixed`` on a CUDA GPU with bf16 (Ampere or newer), ``16-mixed`` on an older CUDA GPU;
* ``bf16-mixed`` on a CPU where bf16 really is fast: the CPU has AVX512-BF16 or AMX, the running
  oneDNN may use them (``ONEDNN_MAX_CPU_ISA`` not below them), ATen's vector kernels run at AVX512
  or higher (``ATEN_CPU_CAPABILITY``), and a short probe (a Linear layer's forward and backward,
  under a second) does not show bf16 autocast far slower than fp32 (emulated bf16 is 5-20x slower; the
  probe is noisy on a busy machine, so it only vetoes);
* ``32-true`` otherwise. Where a CPU lacks bf16 units, oneDNN emulates bf16 10-20x slower than fp32
  (measured on this project's machine with ``ONEDNN_MAX_CPU_ISA=AVX2``: one tiny-Llama training step
  2.3 s in fp32, 40 s in bf16).

The decision is made once per process, logged once with its reason, and handed to child processes
(DDP ranks) through ``CHEMLIT_AUTO_PRECISION`` so that every rank trains in the same precision. An
explicit ``trainer.precision`` in a config or on the command line always wins.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

AUTO_ENV = "CHEMLIT_AUTO_PRECISION"   # "<precision>|<reason>", set by the first decision in a process tree
# The probe vetoes bf16 below this speed-up. On this project's machine (AVX512-BF16) the probe gave 1.1x, 1.5x
# and 1.9x within one afternoon, and 0.5-1.2x while another job used both cores, where a real training step
# runs 1.8x faster in bf16; under emulation (ONEDNN_MAX_CPU_ISA=AVX2) it gives about 0.2x and a training step
# 0.06x. Only a slow-down far beyond noise is a reason to distrust what torch reports.
PROBE_SPEEDUP = 0.4

# oneDNN's ISA names, weakest first (ONEDNN_MAX_CPU_ISA takes one of them, or ALL / DEFAULT).
ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
               "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"]


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str


@dataclass(frozen=True)
class CpuFacts:
    """What decides bf16 on a CPU; each field as the running torch reports it."""
    has_bf16_units: bool          # AVX512-BF16 or AMX-BF16 in the CPU (torch.cpu.get_capabilities())
    onednn_bf16: bool             # oneDNN will use them (False when ONEDNN_MAX_CPU_ISA is below AVX512_CORE_BF16)
    aten_capability: str          # ATen's vector ISA: DEFAULT | AVX2 | AVX512 | ... (ATEN_CPU_CAPABILITY honoured)
    onednn_max_isa: str = ""      # the variable's value, for the reason only


def cpu_facts() -> CpuFacts:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    units = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", ""))
    if max_isa.upper() in ONEDNN_ISAS and ONEDNN_ISAS.index(max_isa.upper()) < ONEDNN_ISAS.index("AVX512_CORE_BF16"):
        onednn = False  # the running oneDNN reads the variable too; belt and braces for older builds
    return CpuFacts(units, onednn, torch.backends.cpu.get_cpu_capability(), max_isa)


def bf16_probe(rows: int = 2048, width: int = 256, out: int = 704, repeats: int = 5) -> tuple[float, float]:
    """Seconds for one forward+backward of a Linear layer on ``rows`` rows: (fp32, bf16 autocast), best of
    ``repeats`` after one warm-up each. About 0.1-0.5 s in all where bf16 is fast."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(width, out)
    x = torch.randn(rows, width, generator=generator)

    def once(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        y.float().square().mean().backward()
        layer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    timings = {}
    for bf16 in (False, True):
        once(bf16)
        timings[bf16] = min(once(bf16) for _ in range(repeats))
    return timings[False], timings[True]


def decide_cpu(facts: CpuFacts, probe: Callable[[], tuple[float, float]] = bf16_probe) -> PrecisionChoice:
    """The CPU half of ``auto``; ``probe`` runs only when every reported fact allows bf16."""
    if not facts.has_bf16_units:
        return PrecisionChoice("32-true", "CPU has no AVX512-BF16 or AMX: bf16 would be emulated, far slower than fp32")
    if not facts.onednn_bf16:
        limit = f" (ONEDNN_MAX_CPU_ISA={facts.onednn_max_isa})" if facts.onednn_max_isa else ""
        return PrecisionChoice("32-true", f"oneDNN may not use the CPU's bf16 instructions{limit}: bf16 would be "
                                          "emulated, far slower than fp32")
    if facts.aten_capability.upper() not in ("AVX512", "AMX", "AVX512_BF16", "SVE256", "SVE"):
        return PrecisionChoice("32-true", f"ATen runs at {facts.aten_capability} (ATEN_CPU_CAPABILITY): its bf16 "
                                          "kernels would convert in software")
    fp32, bf16 = probe()
    speedup = fp32 / max(bf16, 1e-9)
    measured = f"probe: a Linear's forward+backward {fp32 * 1e3:.1f} ms in fp32, {bf16 * 1e3:.1f} ms in bf16"
    if speedup >= PROBE_SPEEDUP:
        return PrecisionChoice("bf16-mixed", f"CPU has bf16 units and oneDNN uses them; {measured} ({speedup:.1f}x)")
    return PrecisionChoice("32-true", f"CPU reports bf16 units but bf16 runs slower than fp32 here; {measured}")


def decide_cuda(bf16_supported: bool, name: str) -> PrecisionChoice:
    if bf16_supported:
        return PrecisionChoice("bf16-mixed", f"CUDA GPU {name} has bf16")
    return PrecisionChoice("16-mixed", f"CUDA GPU {name} has no bf16: fp16 autocast with loss scaling")


def uses_cuda(accelerator: object) -> bool:
    """Whether a Trainer given ``accelerator`` (a name or an Accelerator object) trains on a CUDA GPU."""
    name = (accelerator if isinstance(accelerator, str) else type(accelerator).__name__).lower()
    return name == "gpu" or "cuda" in name or (name == "auto" and torch.cuda.is_available())


def resolve_accelerator(accelerator: object = "auto", cuda_available: Optional[bool] = None) -> object:
    """chemlit's ``auto``: a CUDA GPU where torch sees one, else the CPU. Lightning's own ``auto`` would also
    take Apple's MPS (or a TPU), which chemlit's stages are not tested on: those are used only when asked for by
    name. Anything but ``auto`` is returned unchanged."""
    if not (isinstance(accelerator, str) and accelerator == "auto"):
        return accelerator
    return "gpu" if (torch.cuda.is_available() if cuda_available is None else cuda_available) else "cpu"


def cuda_has_bf16() -> bool:
    """A CUDA GPU is here and computes bf16 natively (Ampere or newer; emulated bf16 does not count)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(accelerator: object = "auto") -> PrecisionChoice:
    """The precision ``auto`` means on this machine for ``accelerator``; decided once per process tree."""
    inherited = os.environ.get(AUTO_ENV, "")
    cuda = uses_cuda(accelerator)
    key = "cuda" if cuda else "cpu"
    if inherited.startswith(key + "|"):
        _, precision, reason = inherited.split("|", 2)
        return PrecisionChoice(precision, reason)
    if cuda:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        choice = decide_cuda(cuda_has_bf16(), torch.cuda.get_device_name(index))
    else:
        choice = decide_cpu(cpu_facts())
    os.environ[AUTO_ENV] = f"{key}|{choice.precision}|{choice.reason}"
    log.info("precision auto -> %s: %s", choice.precision, choice.reason)
    return choice


def resolve_precision(precision: Optional[object], accelerator: object = "auto") -> Optional[object]:
    """``auto`` (or nothing) becomes this machine's choice; any explicit precision is returned unchanged."""
    if precision is None or str(precision) == "auto":
        return choose_precision(accelerator).precision
    return precision


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and ``taskset`` set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
