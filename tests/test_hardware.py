"""precision: auto -- bf16 only where this machine runs it fast; explicit settings win; every rank agrees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chemlit.hardware import (
    AUTO_ENV,
    CpuFacts,
    choose_precision,
    decide_cpu,
    decide_cuda,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = CpuFacts(has_bf16_units=True, onednn_bf16=True, aten_capability="AVX512")


def no_probe():
    raise AssertionError("the probe must not run when the reported facts already rule bf16 out")


@pytest.mark.parametrize("facts, phrase", [
    (CpuFacts(False, False, "AVX2"), "no AVX512-BF16 or AMX"),
    (CpuFacts(True, False, "AVX512", "AVX2"), "ONEDNN_MAX_CPU_ISA=AVX2"),
    (CpuFacts(True, True, "AVX2"), "ATEN_CPU_CAPABILITY"),
    (CpuFacts(True, True, "DEFAULT"), "ATEN_CPU_CAPABILITY"),
])
def test_cpu_without_usable_bf16_units_trains_in_fp32(facts, phrase):
    choice = decide_cpu(facts, probe=no_probe)
    assert choice.precision == "32-true"
    assert phrase in choice.reason


def test_cpu_with_bf16_units_needs_the_probe_to_agree():
    assert decide_cpu(FAST, probe=lambda: (0.020, 0.008)).precision == "bf16-mixed"
    # probe noise on real bf16 units (1.1x, and 0.54x while another job used both cores, both measured on
    # this project's AVX512-BF16 machine) must not flip the decision...
    assert decide_cpu(FAST, probe=lambda: (0.0122, 0.0109)).precision == "bf16-mixed"
    assert decide_cpu(FAST, probe=lambda: (0.0243, 0.0450)).precision == "bf16-mixed"
    # ...but bf16 clearly slower than fp32 (emulated, whatever the CPU reports) is refused
    slow = decide_cpu(FAST, probe=lambda: (0.004, 0.050))
    assert slow.precision == "32-true" and "slower than fp32" in slow.reason


def test_gpus():
    assert decide_cuda(True, "H200").precision == "bf16-mixed"
    assert decide_cuda(False, "Tesla T4").precision == "16-mixed"


def test_a_decision_is_inherited_by_child_processes(monkeypatch):
    """DDP ranks start as child processes: they take the parent's decision instead of probing again, so a
    noisy probe can never make ranks train in different precisions."""
    monkeypatch.setenv(AUTO_ENV, "cpu|bf16-mixed|decided by the parent")
    assert choose_precision("cpu").precision == "bf16-mixed"
    monkeypatch.setenv(AUTO_ENV, "cpu|32-true|decided by the parent")
    assert choose_precision("cpu").precision == "32-true"


CHILD = """
import json, sys
from chemlit.cli import ChemlitCLI
from chemlit.hardware import cpu_facts
args = ["--config", "configs/quickstart/sft.yaml", "--trainer.logger", "false",
        "--trainer.callbacks=[]"] + sys.argv[1:]
cli = ChemlitCLI(args=args, run=False)
facts = cpu_facts()
print(json.dumps({"precision": str(cli.trainer.precision), "onednn_bf16": facts.onednn_bf16,
                  "aten": facts.aten_capability}))
"""


def trainer_precision(extra_args: list[str], env: dict) -> dict:
    """The precision of the Trainer the CLI builds from the quickstart SFT config, in a fresh process (oneDNN
    and ATen read their ISA variables once, at start)."""
    full_env = {k: v for k, v in os.environ.items() if k != AUTO_ENV} | env
    out = subprocess.run([sys.executable, "-c", CHILD, *extra_args], cwd=ROOT, env=full_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.slow
def test_auto_honours_the_isa_limiting_variables_and_an_explicit_precision_wins():
    # The quickstart config says `precision: auto`; with oneDNN and ATen held to AVX2 bf16 would be emulated.
    limited = trainer_precision([], AVX2_ONLY)
    assert limited == {"precision": "32-true", "onednn_bf16": False, "aten": "AVX2"}  # what torch itself reports
    assert trainer_precision(["--trainer.precision", "bf16-mixed"], AVX2_ONLY)["precision"] == "bf16-mixed"
    assert trainer_precision(["--trainer.precision", "32-true"], {})["precision"] == "32-true"


def test_auto_accelerator_is_a_cuda_gpu_or_the_cpu_never_an_untested_one(monkeypatch, tmp_path):
    # The quickstart configs say `accelerator: auto` so that the README's command uses a GPU where there is one;
    # Lightning's own auto would also take Apple's MPS, which chemlit's stages are not tested on.
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.fabric.accelerators.mps import MPSAccelerator as FabricMPS
    from lightning.pytorch.accelerators.mps import MPSAccelerator

    from chemlit.cli import ChemlitTrainer
    from chemlit.hardware import resolve_accelerator

    assert resolve_accelerator("auto", cuda_available=True) == "gpu"
    assert resolve_accelerator("auto", cuda_available=False) == "cpu"
    assert resolve_accelerator("mps", cuda_available=True) == "mps"   # named: as asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for mps in (MPSAccelerator, FabricMPS):   # Lightning's auto asks the latter: as on an Apple-silicon Mac
        monkeypatch.setattr(mps, "is_available", staticmethod(lambda: True))
    trainer = ChemlitTrainer(accelerator="auto", devices=1, precision="32-true", logger=False,
                             enable_checkpointing=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer.accelerator, CPUAccelerator)
