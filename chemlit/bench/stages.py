"""Throughput of each stage beside this machine's own fp32 matmul peak on the stage's shapes.

    python -m chemlit.bench stages [--steps 3] [--isa native|avx2|both] [--out docs] [--small]

For each stage, real training steps of the quickstart model (the 3.5M-parameter tiny Llama of
``configs/quickstart``, random weights, made and exported by ``bench_model_and_prompts``)
at the quickstart configs' shapes, in fp32 (``32-true``), through the stage's own LightningModule and
a Lightning Trainer: CPT and SFT an optimizer step (``training_step``, backward, gradient clipping,
AdamW), PPO one whole iteration (rollout, scoring, evaluation, ``ppo_epochs`` x ``num_minibatches``
updates). Each stage gets one batch of its own training loader (the quickstart batch size and sequence
length; SFT and PPO prompts with the descriptor estimate, as sft.yaml says, fitted or read from chemlit's cache)
and trains on it every step, so every step has the same shapes: step 1 is a warm-up, step 2 is counted
(below), steps 3 .. are timed (median reported). With random weights PPO's greedy rationale runs to
``max_new_tokens`` (a trained model stops after its rationale), so its iteration is longer than a trained
model's: the table gives its prefix length.

FLOPs: the counted step runs under ``torch.utils.flop_counter.FlopCounterMode``, the library's counter,
with one addition: it has no formula for the CPU attention kernels (``_scaled_dot_product_flash_attention_
for_cpu`` and its backward, what ``scaled_dot_product_attention`` runs on a CPU), which it would count as
0 FLOPs, so they get the library's own formulas for its GPU attention kernels (``sdpa_flop_count``: the
full score matrix, causal masking not subtracted, as the library counts everywhere). The counting step
is not timed: the counter handles every op in Python.

Peak: the counter also keeps the (batch, m, k, n) of every matmul it counted (an attention call as the
batched matmuls of its formula). The shapes carrying the most FLOPs (until 90 % of them, at most 12) are
timed alone with ``torch.mm`` / ``torch.bmm`` (fp32, this process's threads, best of 5), and the peak is
their FLOP-weighted harmonic mean, sum(F) / sum(F / rate): the rate at which this machine's matmuls
would do the stage's matmul FLOPs. % of peak = achieved (all counted FLOPs / median step seconds) / peak.

``--isa avx2`` reruns all of it in a child process (``--isa native --json-out ...``) with ``AVX2_ENV``
added: oneDNN, ATen's vector kernels and MKL limited to AVX2, as on a CPU without AVX512.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from chemlit.data.files import write_whole

aten = torch.ops.aten
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
STAGES = ("cpt", "sft", "ppo")
UNITS = {"cpt": "tokens/s", "sft": "molecules/s", "ppo": "samples/s"}
PPO_PHASES = ("rollout", "evaluate", "update")  # PPOModule methods; PhaseClock laps of the same names
# --small: shapes for a smoke test of the benchmark itself (seconds), not a measurement
SMALL = {"cpt": {"batch_size": 2, "max_length": 32}, "sft": {"batch_size": 2, "max_length": 48},
         "ppo": {"batch_size": 2, "ppo": {"samples_per_prompt": 2, "max_new_tokens": 8, "answer_max_new_tokens": 4,
                                          "ppo_epochs": 1, "num_minibatches": 2}}}
SMALL_MOLECULES = 200  # --small: molecules in each stage's datamodule


# ---------------------------------------------------------------------------------------------- the bench model
def bench_model_and_prompts(directory: Path, prompts: int, samples_per_prompt: int, seed: int = 0):
    """A tiny model with random weights and a tokenizer trained on the built-in table's texts."""
    from chemlit.data.datamodule import RationaleDataModule
    from chemlit.data.tokenizer import train_smiles_tokenizer
    from chemlit.models.factory import TinyConfig, build_tiny, export_model

    data = RationaleDataModule(stage="rl", batch_size=prompts, run_dir=str(directory / "data"), seed=seed)
    data.setup("fit")
    tokenizer = train_smiles_tokenizer(data.tokenizer_corpus(), vocab_size=1024)
    torch.manual_seed(seed)
    model = build_tiny(TinyConfig(), len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                       tokenizer.eos_token_id)
    export_model(model, tokenizer, directory / "model", {"stage": "bench"})
    data.tokenizer = tokenizer
    batch = data.collate_rl(data.examples("train")[:prompts])
    ids = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    (directory / "prompts.json").write_text(json.dumps([p for p in ids for _ in range(samples_per_prompt)]))
    return data, directory / "model"


# ---------------------------------------------------------------------------------------------- FLOPs
def matmul_key(a, b) -> tuple[int, int, int, int]:
    """(batch, m, k, n) of a matmul of shapes a (m, k) or (batch, m, k) and b (k, n) or (batch, k, n)."""
    return (int(a[0]), int(a[1]), int(a[2]), int(b[2])) if len(a) == 3 else (1, int(a[0]), int(a[1]), int(b[1]))


def sdpa_matmuls(query, key, value, grad_out=None) -> list[tuple[int, int, int, int]]:
    """The batched matmuls torch's attention formulas count (``sdpa_flop_count``, ``sdpa_backward_flop_count``
    with ``grad_out``), as (batch, m, k, n)."""
    b, h, s_q, d_q = query
    s_k, d_v = key[2], value[3]
    if grad_out is None:
        return [(b * h, s_q, d_q, s_k), (b * h, s_q, s_k, d_v)]
    return [(b * h, s_q, d_q, s_k), (b * h, s_q, d_v, s_k), (b * h, s_k, s_q, d_v), (b * h, s_q, s_k, d_q),
            (b * h, d_q, s_q, s_k)]


class FlopCount:
    """``FlopCounterMode`` (display off) with the CPU attention kernels added, that also keeps what it counted
    by matmul shape, by op, and forward/backward. A context manager; ``total`` may be read inside it."""

    def __init__(self):
        self.shapes: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])   # (batch, m, k, n) -> [FLOPs, calls]
        self.passes: dict[str, int] = defaultdict(int)                      # forward / backward -> FLOPs
        self.forward_by_module: dict[str, int] = defaultdict(int)           # see by_layer
        mapping = {op: self._matmul(op, operands) for op, operands in
                   ((aten.mm, (0, 1)), (aten.addmm, (1, 2)), (aten.bmm, (0, 1)), (aten.baddbmm, (1, 2)))}
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = self._attention
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = self._attention_backward
        self.counter = FlopCounterMode(display=False, custom_mapping=mapping)

    def __enter__(self) -> "FlopCount":
        for kept in (self.shapes, self.passes, self.forward_by_module):
            kept.clear()
        self.counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.counter.__exit__(*exc)

    @property
    def total(self) -> int:
        return self.counter.get_total_flops()

    def _add(self, keys: list[tuple], flops: list[int]) -> None:
        for key, f in zip(keys, flops):
            self.shapes[key][0] += f
            self.shapes[key][1] += 1
        tracker = self.counter.mod_tracker
        if tracker.is_bw:
            self.passes["backward"] += sum(flops)
            return
        self.passes["forward"] += sum(flops)
        # forward only: in backward the tracker's module set is not exact (one op lands in several modules)
        innermost = max(tracker.parents, key=lambda name: (name.count("."), name != "Global"))
        self.forward_by_module[innermost.rsplit(".", 1)[-1] if innermost != "Global" else "outside modules"] += sum(flops)

    def _matmul(self, op, operands: tuple[int, int]) -> Callable:
        formula = flop_registry[op]  # the library's own

        def count(*args, out_shape=None, **kwargs) -> int:
            flops = formula(*args, **kwargs)
            self._add([matmul_key(args[operands[0]], args[operands[1]])], [flops])
            return flops
        return count

    def _attention(self, query, key, value, *args, out_shape=None, **kwargs) -> int:
        keys = sdpa_matmuls(query, key, value)
        self._add(keys, [flop_registry[aten.bmm]((b, m, k), (b, k, n)) for b, m, k, n in keys])
        return sdpa_flop_count(query, key, value)

    def _attention_backward(self, grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        keys = sdpa_matmuls(query, key, value, grad_out)
        self._add(keys, [flop_registry[aten.bmm]((b, m, k), (b, k, n)) for b, m, k, n in keys])
        return sdpa_backward_flop_count(grad_out, query, key, value)

    def by_op(self) -> dict[str, int]:
        return {str(op): int(f) for op, f in self.counter.get_flop_counts().get("Global", {}).items()}

    def by_layer(self) -> dict[str, int]:
        """Forward FLOPs by the innermost module that ran them, by its name's last part (q_proj, up_proj, lm_head;
        self_attn: the attention's own matmuls), policy and frozen reference together; largest first."""
        return dict(sorted(self.forward_by_module.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------------- peak
def time_matmul(shape: tuple[int, int, int, int], trials: int = 5, min_seconds: float = 0.02) -> float:
    """Seconds of one fp32 ``torch.mm`` (batch 1) or ``torch.bmm`` of shape (batch, m, k, n): the best of
    ``trials``, each at least ``min_seconds`` of calls, after a warm-up call."""
    b, m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    if b == 1:
        x, y, out = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator), torch.empty(m, n)
        call = lambda: torch.mm(x, y, out=out)  # noqa: E731
    else:
        x, y, out = (torch.randn(b, m, k, generator=generator), torch.randn(b, k, n, generator=generator),
                     torch.empty(b, m, n))
        call = lambda: torch.bmm(x, y, out=out)  # noqa: E731
    started = time.perf_counter()
    call()
    reps = max(1, int(min_seconds / max(time.perf_counter() - started, 1e-7)))
    best = math.inf
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - started) / reps)
    return best


def matmul_peak(shapes: dict[tuple, list[int]], coverage: float = 0.9, most: int = 12,
                seconds_of: Callable[[tuple], float] = time_matmul) -> dict:
    """The fp32 matmul peak on a step's shapes ({(batch, m, k, n): [FLOPs, calls]}): the shapes with the most
    FLOPs, until ``coverage`` of them or ``most`` shapes, each timed alone (``seconds_of``, one call), and
    their FLOP-weighted harmonic mean sum(F) / sum(F / rate)."""
    total = sum(f for f, _ in shapes.values())
    timed, covered, seconds = [], 0, 0.0
    for shape, (flops, calls) in sorted(shapes.items(), key=lambda kv: -kv[1][0]):
        if timed and (covered >= coverage * total or len(timed) >= most):
            break
        rate = flops / calls / seconds_of(shape)
        timed.append({"shape": list(shape), "flops": flops, "calls": calls, "gflops_per_s": rate / 1e9})
        covered += flops
        seconds += flops / rate
    return {"gflops_per_s": covered / seconds / 1e9 if seconds else math.nan, "coverage": covered / total if total else 0.0,
            "shapes": timed, "distinct_shapes": len(shapes), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- stages
class SameBatch:
    """The stage's training loader, reduced to one batch given ``steps`` times: every step the same shapes."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return iter([self.batch] * self.steps)

    def __len__(self) -> int:
        return self.steps


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
OP_KINDS = ("matmul", "attention", "other ops", "outside ops")


def time_by_kind(self_seconds: dict[str, float], wall_seconds: float) -> dict[str, float]:
    """Where a profiled step's time went: {op name: its self CPU seconds (torch.profiler's key averages)} and the
    step's wall seconds -> seconds in the matmuls (``MATMUL_OPS``), the attention kernels, every other ATen op
    (elementwise, copies, norms, softmax, the optimizer's arithmetic), and outside ATen ops: the step's wall time
    less all ATen ops' self time (Python, autograd's engine, Lightning; ranges such as ``Optimizer.step#...`` or
    ``autograd::engine::...`` are that overhead, not ops, so they count here)."""
    kinds = dict.fromkeys(OP_KINDS, 0.0)
    for name, seconds in self_seconds.items():
        if not name.startswith("aten::"):
            continue
        kind = "matmul" if name in MATMUL_OPS else "attention" if "scaled_dot_product" in name else "other ops"
        kinds[kind] += seconds
    kinds["outside ops"] = max(wall_seconds - sum(kinds.values()), 0.0)
    return kinds


class StepClock(L.Callback):
    """Training steps (on_train_batch_start -> on_train_batch_end: the whole optimizer step or PPO iteration):
    the first ``warmup`` untimed, the next one counted (``FlopCount``, untimed), with ``profile`` the next one
    under ``torch.profiler`` (untimed: where its time goes, ``time_by_kind``), then each timed. With
    ``phases``: the module's methods of those names are watched (their FLOPs in the counted step) and the
    growth of ``module.phase_seconds`` in each timed step is kept (PPO's PhaseClock)."""

    def __init__(self, warmup: int = 1, phases: tuple[str, ...] = (), profile: bool = False):
        self.warmup, self.phases, self.profile = warmup, phases, profile
        self.first_timed = warmup + 1 + int(profile)
        self.profiled: Optional[dict] = None  # {"seconds": wall, "kinds": time_by_kind, "ops": top self times}
        self._profiler = None
        self.step = 0
        self.seconds: list[float] = []
        self.phase_seconds: list[dict[str, float]] = []
        self.phase_flops: dict[str, int] = defaultdict(int)
        self.rollouts: list[dict] = []  # PPO: each step's rollout shapes
        self.count: Optional[FlopCount] = None
        self.counting = False

    def on_fit_start(self, trainer, pl_module):
        for name in self.phases:
            self._watch(pl_module, name)

    def _watch(self, module, name: str) -> None:
        original = getattr(module, name)

        def watched(*args, **kwargs):
            before = self.count.total if self.counting else 0
            out = original(*args, **kwargs)
            if self.counting:
                self.phase_flops[name] += self.count.total - before
            if name == "rollout":
                self.rollouts.append({"step": self.step, "groups": int(out.prefix_ids.size(0)),
                                      "prefix_length": int(out.prefix_ids.size(1)),
                                      "response_tokens": int(out.response_mask.sum()),
                                      "samples": int(out.responses.size(0))})
            return out
        setattr(module, name, watched)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step == self.warmup:
            self.count, self.counting = FlopCount().__enter__(), True
        if self.profile and self.step == self.warmup + 1:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU]).__enter__()
        self._phases_before = dict(getattr(pl_module, "phase_seconds", {}))
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._started
        if self.counting:
            self.count.__exit__(None, None, None)
            self.counting = False
        elif self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in self._profiler.key_averages()}
            top = sorted(((k, v) for k, v in ops.items() if k.startswith("aten::")), key=lambda kv: -kv[1])[:8]
            self.profiled = {"seconds": elapsed, "kinds": time_by_kind(ops, elapsed), "ops": dict(top)}
            self._profiler = None
        elif self.step >= self.first_timed:
            self.seconds.append(elapsed)
            now = getattr(pl_module, "phase_seconds", {})
            self.phase_seconds.append({k: v - self._phases_before.get(k, 0.0) for k, v in now.items()})
        self.step += 1


def quickstart(configs: Path, small: bool = False) -> dict[str, dict]:
    """Each stage's model arguments (init_args less model/export_dir) and data arguments from
    ``configs``/<stage>.yaml, with ``SMALL``'s shapes where ``small``; and the trainer's gradient clipping."""
    settings = {}
    for stage in STAGES:
        config = yaml.safe_load((configs / f"{stage}.yaml").read_text())
        model = dict(config["model"]["init_args"])
        tiny = model.pop("model", {}).get("tiny")
        model.pop("export_dir", None)
        data = {k: v for k, v in config["data"].items()
                if k in ("batch_size", "max_length", "rationale_style", "use_rationale", "analogues",
                         "descriptor_estimate", "cpt_replay_ratio", "split", "split_fractions", "seed",
                         "pad_to_multiple_of")}
        if small:
            data.update({k: v for k, v in SMALL[stage].items() if k != "ppo"})
            if "ppo" in SMALL[stage]:
                model["ppo"] = {**model.get("ppo", {}), **SMALL[stage]["ppo"]}
        settings[stage] = {"model": model, "data": data, "tiny": tiny,
                           "gradient_clip_val": config.get("trainer", {}).get("gradient_clip_val")}
    # PPO's prompts are its SFT export's (chemlit.stages.handover): with the descriptor estimate if SFT had it
    for key in ("descriptor_estimate", "analogues"):
        if key in settings["sft"]["data"]:
            settings["ppo"]["data"].setdefault(key, settings["sft"]["data"][key])
    return settings


def stage_module(stage: str, model_args: dict, model_dir: Path):
    """The stage's LightningModule with the quickstart's arguments, starting from the bench model."""
    from chemlit.models.factory import CPTLora, ModelSpec, SFTLora
    from chemlit.rl.curriculum import CurriculumSpec
    from chemlit.rl.kl import KLSpec
    from chemlit.rl.rewards import RewardSpec
    from chemlit.stages.cpt import CPTModule
    from chemlit.stages.ppo import PPOLora, PPOModule, PPOSpec
    from chemlit.stages.sft import SFTModule

    cls, specs = {"cpt": (CPTModule, {"lora": CPTLora}), "sft": (SFTModule, {"lora": SFTLora}),
                  "ppo": (PPOModule, {"lora": PPOLora, "ppo": PPOSpec, "kl": KLSpec, "reward": RewardSpec,
                                      "curriculum": CurriculumSpec})}[stage]
    args = {k: specs[k](**v) if k in specs and isinstance(v, dict) else v for k, v in model_args.items()}
    return cls(model=ModelSpec(source="pretrained", path=str(model_dir)), **args)


def stage_step(stage: str, settings: dict, model_dir: Path, tokenizer, work: Path, steps: int, warmup: int = 1,
               max_molecules: Optional[int] = None) -> dict:
    """``warmup`` + 1 counted + ``steps`` timed training steps of ``stage`` on one batch of its loader."""
    from chemlit.data.datamodule import RationaleDataModule

    L.seed_everything(0, verbose=False)
    data = RationaleDataModule(stage="rl" if stage == "ppo" else stage, run_dir=str(work / stage / "data"),
                               max_molecules=max_molecules, **settings["data"])
    data.setup("fit")
    data.tokenizer = tokenizer  # the bench model's: the stage sets the same one again in its setup
    batch = next(iter(data.train_dataloader()))
    data.train_dataloader = lambda: SameBatch(batch, warmup + 2 + steps)
    module = stage_module(stage, settings["model"], model_dir)
    module.export_dir = str(work / stage / "export")
    clock = StepClock(warmup, PPO_PHASES if stage == "ppo" else (), profile=True)
    clip = {} if stage == "ppo" else {"gradient_clip_val": settings["gradient_clip_val"]}
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1,
                        limit_train_batches=warmup + 2 + steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], default_root_dir=str(work / stage), **clip)
    trainer.fit(module, data)
    return summarize_stage(stage, batch, clock, settings)


def summarize_stage(stage: str, batch: dict, clock: StepClock, settings: dict) -> dict:
    """Throughput, FLOPs (total, by op, by layer kind, forward/backward), the matmul peak on the step's shapes,
    and (PPO) the phases' FLOPs and seconds."""
    count = clock.count
    step_s = statistics.median(clock.seconds)
    flops = count.total
    result = {"stage": stage, "unit": UNITS[stage], "step_seconds": clock.seconds, "median_step_seconds": step_s,
              "flops_per_step": flops, "achieved_gflops_per_s": flops / step_s / 1e9,
              "flops_by_op": count.by_op(), "flops_by_layer": count.by_layer(), "flops_by_pass": dict(count.passes),
              "peak": matmul_peak(count.shapes), "data": settings["data"], "profiled": clock.profiled}
    if clock.profiled:  # the matmuls' own rate inside the step: their FLOPs over their profiled time
        matmul_flops = sum(f for op, f in result["flops_by_op"].items() if op.replace(".", "::", 1) in MATMUL_OPS)
        seconds = clock.profiled["kinds"]["matmul"]
        result["matmul_gflops_per_s_in_step"] = matmul_flops / seconds / 1e9 if seconds else None
    if stage in ("cpt", "sft"):
        tokens = int(batch["attention_mask"].sum())
        rows, length = batch["input_ids"].shape
        result.update(batch={"rows": rows, "length": length, "tokens": tokens},
                      tokens_per_s=tokens / step_s, molecules_per_s=rows / step_s if stage == "sft" else None)
        result["throughput"] = result["tokens_per_s"] if stage == "cpt" else result["molecules_per_s"]
    else:
        timed = [r for r in clock.rollouts if r["step"] >= clock.first_timed]
        counted = next(r for r in clock.rollouts if r["step"] == clock.warmup)
        samples = counted["samples"]
        phases = {}
        for phase in clock.phase_seconds[0]:
            seconds = statistics.mean(p.get(phase, 0.0) for p in clock.phase_seconds)
            f = clock.phase_flops.get(phase, 0)
            phases[phase] = {"seconds": seconds, "flops": f, "gflops_per_s": f / seconds / 1e9 if seconds else None}
        rest = statistics.mean(s - sum(p.values()) for s, p in zip(clock.seconds, clock.phase_seconds))
        phases["other"] = {"seconds": rest, "flops": flops - sum(clock.phase_flops.values()), "gflops_per_s": None}
        result.update(batch={"molecules": int(batch["prompt_ids"].size(0)), "samples": samples,
                             "prompt_length": int(batch["prompt_ids"].size(1))},
                      samples_per_s=samples / step_s, throughput=samples / step_s, phases=phases,
                      counted_rollout=counted, timed_rollouts=timed, ppo=settings["model"].get("ppo"))
    peak = result["peak"]["gflops_per_s"]
    result["percent_of_peak"] = 100 * result["achieved_gflops_per_s"] / peak
    return result


def stages_benchmark(steps: int = 3, warmup: int = 1, small: bool = False, configs: Path = Path("configs/quickstart"),
                     stages: tuple[str, ...] = STAGES) -> dict:
    """Every stage of the quickstart at its shapes in this process (its CPU, its threads, its environment)."""
    from chemlit.bench.machine import cpu_description, machine
    from chemlit.models.factory import TinyConfig

    settings = quickstart(configs, small)
    for stage in ("cpt", "sft"):  # the bench model is the quickstart's
        tiny = settings[stage]["tiny"]
        if tiny and TinyConfig(**tiny) != TinyConfig():
            raise SystemExit(f"chemlit bench stages: {configs}/{stage}.yaml's tiny model {tiny} is not the bench "
                             f"model (TinyConfig() = {TinyConfig()}); bench_model_and_prompts builds TinyConfig()")
    ppo = settings["ppo"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, model_dir = bench_model_and_prompts(work, ppo["data"].get("batch_size", 32),
                                                  ppo["model"].get("ppo", {}).get("samples_per_prompt", 8))
        for stage in stages:
            results[stage] = stage_step(stage, settings[stage], model_dir, data.tokenizer, work, steps, warmup,
                                        SMALL_MOLECULES if small else None)
    return {"machine": machine(), "cpu": cpu_description(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ[k] for k in AVX2_ENV if k in os.environ}, "threads": torch.get_num_threads(),
            "steps": steps, "warmup": warmup, "small": small, "configs": str(configs),
            "model": "tiny Llama 3.5M (TinyConfig()), random weights, fp32 (32-true)", "stages": results}


# ---------------------------------------------------------------------------------------------- report
STAGES_HEADING = "## Stage throughput against the fp32 matmul peak"


def _throughput_cell(result: dict) -> str:
    cell = f"{result['throughput']:,.0f} {result['unit']}" if result["throughput"] >= 100 \
        else f"{result['throughput']:.1f} {result['unit']}"
    if result["stage"] == "sft":
        cell += f" ({result['tokens_per_s']:,.0f} tokens/s)"
    return cell


def _shape_cell(result: dict) -> str:
    b = result["batch"]
    if result["stage"] == "ppo":
        spec = result.get("ppo") or {}
        r = result["counted_rollout"]
        return (f"{b['molecules']} molecules x {spec.get('samples_per_prompt')} samples, prefix {r['prefix_length']} "
                f"tokens, {r['response_tokens'] / max(r['samples'], 1):.1f} response tokens per sample")
    return f"{b['rows']} x {b['length']} ({b['tokens']} real tokens)"


def _where(result: dict) -> str:
    total = result["flops_per_step"] or 1
    forward = sum(result["flops_by_layer"].values()) or 1
    layers = ", ".join(f"{name} {f / forward:.0%}" for name, f in result["flops_by_layer"].items() if f / forward >= 0.01)
    passes = " / ".join(f"{name} {f / total:.0%}" for name, f in result["flops_by_pass"].items())
    peak = result["peak"]
    shapes = "; ".join(f"{'x'.join(map(str, s['shape']))} {s['gflops_per_s']:.0f}" for s in peak["shapes"][:4])
    line = (f"- {result['stage']}: {_shape_cell(result)}. {passes} of the FLOPs; forward FLOPs by module: {layers}. "
            f"Peak from {len(peak['shapes'])} "
            f"of {peak['distinct_shapes']} matmul shapes ({peak['coverage']:.0%} of the FLOPs; batch x m x k x n "
            f"GFLOP/s: {shapes})")
    profiled = result.get("profiled")
    if profiled:
        wall = profiled["seconds"] or 1
        kinds = ", ".join(f"{kind} {seconds / wall:.0%}" for kind, seconds in profiled["kinds"].items())
        ops = ", ".join(name.replace("aten::", "") for name in list(profiled["ops"])[:6])
        rate = result.get("matmul_gflops_per_s_in_step")
        line += (f". Time of one profiled step ({wall:.2f} s under torch.profiler, untimed): {kinds}; the ATen ops "
                 f"with the most self time: {ops}"
                 + (f"; the matmuls ran at {rate:.0f} GFLOP/s inside the step ({rate / peak['gflops_per_s']:.0%} of "
                    f"the peak)" if rate else ""))
    if result["stage"] == "ppo":
        phases = ", ".join(f"{name} {p['seconds']:.2f} s, {p['flops'] / 1e9:.2f} GFLOP"
                           + (f" ({p['gflops_per_s']:.1f} GFLOP/s)" if p["flops"] else "")
                           for name, p in result["phases"].items())
        line += f". Phases per iteration: {phases}"
    return line + "."


def stages_markdown(summary: dict) -> str:
    """One table per CPU kind: | stage | throughput | step s | GFLOP per step | achieved GFLOP/s | fp32 matmul
    peak on its shapes GFLOP/s | % of peak |, with the machine line, the command and where the FLOPs go."""
    lines = [STAGES_HEADING, "",
             f"Made by: `{summary['command']}` ({summary['date']}). Each stage: the quickstart model "
             "(tiny Llama 3.5M, random weights) in fp32 at the quickstart configs' shapes, the stage's own "
             "LightningModule; step s = median of the timed steps (an optimizer step; PPO: a whole iteration). "
             "FLOPs counted by torch's FlopCounterMode (CPU attention added); peak = this machine's torch.mm/bmm "
             "on the step's own matmul shapes, FLOP-weighted (chemlit/bench/stages.py).", ""]
    for run in summary["runs"]:
        env = " ".join(f"{k}={v}" for k, v in run["env"].items())
        lines += [f"### {run['kind']}: {run['cpu']}" + (f" under `{env}`" if env else ""), "",
                  f"Machine: {run['machine']}; ATen {run['aten_capability']}; {run['steps']} timed step(s) after "
                  f"{run['warmup']} warm-up and 1 counted" + (" (--small shapes: not a measurement)" if run["small"] else "")
                  + ".", "",
                  "| stage | throughput | step s | GFLOP per step | achieved GFLOP/s | fp32 matmul peak on its shapes "
                  "GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|"]
        for stage, r in run["stages"].items():
            achieved, peak = r["achieved_gflops_per_s"], r["peak"]["gflops_per_s"]
            lines.append(f"| {stage} | {_throughput_cell(r)} | {r['median_step_seconds']:.3f} | "
                         f"{r['flops_per_step'] / 1e9:.2f} | {achieved:.1f} | {peak:.1f} | {100 * achieved / peak:.0f} % |")
        lines += ["", "Where the FLOPs and the time go (what bounds a stage below the peak: the share of its "
                  "time outside the matmuls):", ""] + [_where(r) for r in run["stages"].values()] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- runs
def child_run(arguments: list[str], env: dict[str, str]) -> dict:
    """``python -m chemlit.bench <arguments> --isa native`` in a new process with ``env`` added (ATen reads its CPU
    capability once, at import): the one run it writes to a ``--json-out`` file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, "-m", "chemlit.bench", *arguments, "--isa", "native", "--json-out", str(out)]
        subprocess.run(command, env=dict(os.environ, **env), check=True)
        return json.loads(out.read_text())["runs"][0]


def measure_on_cpu_kinds(isa: str, here: Callable[[], dict], arguments: list[str], path: Path, command: str) -> dict:
    """``here()`` in this process (isa native, both) and the same benchmark (``arguments``) in a child limited to
    AVX2 (isa avx2, both), written whole to ``path``: {"command", "date", "runs": [{"kind": ..., ...}]}."""
    runs = []
    if isa in ("native", "both"):
        runs.append({"kind": "native", **here()})
    if isa in ("avx2", "both"):
        runs.append({**child_run(arguments, AVX2_ENV), "kind": "AVX2"})
    summary = {"command": command, "date": time.strftime("%Y-%m-%d"), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(summary, indent=2) + "\n")
    return summary


def run(out_dir: Path, isa: str = "native", steps: int = 3, warmup: int = 1, small: bool = False,
        configs: Path = Path("configs/quickstart"), command: str = "", json_out: Optional[Path] = None) -> dict:
    """The native and/or AVX2 measurement, written to ``json_out`` or ``out_dir``/stages.json."""
    arguments = ["stages", "--steps", str(steps), "--warmup", str(warmup), "--configs", str(configs)] \
        + (["--small"] if small else [])
    return measure_on_cpu_kinds(isa, lambda: stages_benchmark(steps, warmup, small, configs), arguments,
                                json_out or out_dir / "stages.json", command)
