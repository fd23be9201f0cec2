"""Samples per second of one PPO iteration: chemlit's PPOModule against TRL 0.11.4's PPOTrainer.

Both get the same tiny model (3.5M-parameter Llama, random weights, saved once and loaded by both),
the same prompts (16 molecules x 8 samples = 128 per iteration), the same response budget, the
same PPO epochs and minibatches. An iteration is rollout (sampling) + the whole update; the first
iteration of each is a warm-up and is not counted.

The two run in turn, one iteration each: chemlit's iteration i, then TRL's iteration i, and so on.
On a shared machine whose speed drifts by 20-30 % within minutes (seen here: the same chemlit code
took 17.4 s per iteration in one run and 22.9 s in the next, TRL 29.1 and 30.5 s), timing all of one
then all of the other measured the drift as much as the code. The headline ratio is the median of the
per-pair ratios (TRL's seconds / chemlit's, for the same 128 samples); samples/s from each side's
median iteration are reported beside it. Also measured: rollout tokens/s of chemlit's rollout against
the model's own cached decoding loop (``generate``) on the same prompts.

TRL runs in a subprocess whose path holds TRL 0.11.4 (the last TRL with ``PPOTrainer.step``), installed
beforehand with ``--no-deps`` into ``--trl-dir`` by the command in ``TRL_INSTALL`` (chemlit installs
nothing at run time); it runs an iteration each time it is asked (``chemlit/bench/trl_step.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from chemlit.bench.machine import cpu_description
from chemlit.bench.stages import AVX2_ENV, StepClock, bench_model_and_prompts, measure_on_cpu_kinds

TRL_INSTALL = "pip install --no-deps --target {trl_dir} trl==0.11.4 tyro docstring_parser shtab typeguard"


def ensure_trl(trl_dir: Path) -> Path:
    if not (trl_dir / "trl" / "__init__.py").exists():
        raise SystemExit(f"chemlit bench: TRL 0.11.4 is not in {trl_dir}; install it there first with\n  "
                         + TRL_INSTALL.format(trl_dir=trl_dir))
    return trl_dir


class PairedClock(StepClock):
    """``StepClock``'s order (a warm-up, one counted iteration, one profiled, then the timed ones) for chemlit's
    iterations, each timed one's mean response length, and after each iteration ``between(what)``: TRL's
    iteration of the same kind ("step", "count" or "profile"), so the two sides alternate."""

    def __init__(self, between=None):
        super().__init__(warmup=1, profile=True)
        self.between = between
        self.lengths: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if step >= self.first_timed:
            self.lengths.append(float(trainer.callback_metrics["ppo/response_length"]))
        if self.between is not None:
            self.between("count" if step == self.warmup else "profile" if step == self.warmup + 1 else "step")


class TRLProcess:
    """TRL's PPOTrainer in its own process (``chemlit.bench.trl_step``): one iteration each time it is asked."""

    def __init__(self, trl_dir: Path, model_dir: Path, prompts: Path, max_new_tokens: int, ppo_epochs: int,
                 minibatches: int, log: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(trl_dir), os.environ.get("PYTHONPATH", "")]))
        self.log, self._stderr = log, log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chemlit.bench.trl_step", "--model", str(model_dir), "--prompts", str(prompts),
             "--max-new-tokens", str(max_new_tokens), "--ppo-epochs", str(ppo_epochs),
             "--minibatches", str(minibatches)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        ready = self._answer()
        self.version, self.samples = ready["trl_version"], ready["samples"]
        self.iterations: list[dict] = []

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise SystemExit(f"chemlit bench: the TRL run failed:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def iteration(self, what: str = "step") -> None:
        """One iteration: "step" (timed), "count" (its FLOPs counted) or "profile" (where its time goes)."""
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        self.iterations.append({"what": what, **self._answer()})

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait()
        self._stderr.close()

    def result(self) -> dict:
        """The timed iterations (the first "step" is the warm-up) and the counted and profiled ones, in the shape
        ``summarize`` reads."""
        timed = [i for i in self.iterations if i["what"] == "step"][1:]
        extra = {key: i[key] for i in self.iterations for key in ("gflop", "profiled") if key in i}
        return {"trl_version": self.version, "samples": self.samples, **extra,
                "seconds_per_iteration": [i["seconds"] for i in timed],
                "rollout_seconds": [i["rollout_seconds"] for i in timed],
                "mean_response_length": [i["mean_response_length"] for i in timed]}


def chemlit_iterations(data, model_dir: Path, samples_per_prompt: int, max_new_tokens: int, ppo_epochs: int,
                       minibatches: int, iterations: int, between=None) -> dict:
    """chemlit's PPO iterations (a warm-up, a counted and a profiled one, then ``iterations`` timed), ``between(what)``
    after each; then rollout and generate alone."""
    from chemlit.models.factory import ModelSpec
    from chemlit.rl.kl import KLSpec
    from chemlit.stages.ppo import PPOModule, PPOSpec

    L.seed_everything(0)
    module = PPOModule(model=ModelSpec(source="pretrained", path=str(model_dir)), learning_rate=1e-4,
                       ppo=PPOSpec(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                                   ppo_epochs=ppo_epochs, num_minibatches=minibatches),
                       kl=KLSpec(coef=0.02, kind="k1"))
    clock = PairedClock(between)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=clock.first_timed + iterations,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                            default_root_dir=tmp)
        module.export_dir = os.path.join(tmp, "export")
        trainer.fit(module, data)
    # rollout alone, and the model's own cached decoding loop on the same prompts
    batch = next(iter(data.train_dataloader()))
    module.model.eval()
    started = time.perf_counter()
    rollout = module.rollout(batch)
    rollout_seconds = time.perf_counter() - started
    rollout_tokens = int(rollout.response_mask.sum())
    K = samples_per_prompt
    started = time.perf_counter()
    with torch.no_grad():
        out = module.model.generate(input_ids=batch["prompt_ids"].repeat_interleave(K, 0),
                                    attention_mask=batch["prompt_mask"].repeat_interleave(K, 0),
                                    max_new_tokens=max_new_tokens, do_sample=True, top_k=None, top_p=None,
                                    pad_token_id=module.tokenizer.pad_token_id,
                                    eos_token_id=module.tokenizer.eos_token_id)
    generate_seconds = time.perf_counter() - started
    generated = out[:, batch["prompt_ids"].size(1):]
    generate_tokens = int(((generated != module.tokenizer.pad_token_id)).sum())
    return {"seconds_per_iteration": clock.seconds, "mean_response_length": clock.lengths,
            "gflop": clock.count.total / 1e9, "profiled": clock.profiled,
            "rollout_tokens_per_second": rollout_tokens / rollout_seconds,
            "generate_tokens_per_second": generate_tokens / generate_seconds}


def summarize(setup: dict, ours: dict, theirs: dict) -> dict:
    """Samples/s from each side's median iteration, response tokens/s over all timed iterations, and the
    ratio: the median over iteration pairs of TRL's seconds / chemlit's (each pair ran back to back)."""
    samples = setup["samples_per_iteration"]
    for result in (ours, theirs):
        # The median iteration: on a shared 2-core machine single iterations ran up to 2x slower than
        # their neighbours (both implementations); the median is what a typical iteration costs.
        result["samples_per_second"] = samples / statistics.median(result["seconds_per_iteration"])
        # Responses shrink or grow as each policy drifts: tokens/s shows the work done.
        tokens = samples * sum(result["mean_response_length"])
        result["response_tokens_per_second"] = tokens / sum(result["seconds_per_iteration"])
    paired = [t / c for c, t in zip(ours["seconds_per_iteration"], theirs["seconds_per_iteration"])]
    summary = {"setup": setup, "chemlit": ours, "trl": theirs, "paired_ratios": paired,
               "ratio_chemlit_over_trl": statistics.median(paired),
               "ratio_of_median_samples_per_second": ours["samples_per_second"] / theirs["samples_per_second"]}
    if "profiled" in ours and ours["profiled"]:
        summary["twice_trl"] = what_twice_trl_needs(statistics.median(ours["seconds_per_iteration"]),
                                                    statistics.median(theirs["seconds_per_iteration"]),
                                                    ours["profiled"]["kinds"])
    return summary


def what_twice_trl_needs(ours_seconds: float, theirs_seconds: float, kinds: dict[str, float]) -> dict:
    """What twice TRL's samples/s asks of chemlit's iteration, from its median seconds and where one profiled
    iteration's time went (``time_by_kind``): the iteration may take half TRL's median; its matmuls and attention
    (at their share of the profiled iteration) stay; the rest (other ATen ops, Python and autograd's engine)
    has to fit in what is left. ``rest_cut`` is the fraction of the rest that would have to go (above 1: even
    with no time outside the matmuls and attention, the iteration is too slow)."""
    profiled = sum(kinds.values())
    kernels = ours_seconds * (kinds["matmul"] + kinds["attention"]) / profiled
    rest, target = ours_seconds - kernels, theirs_seconds / 2
    return {"target_seconds": target, "matmul_and_attention_seconds": kernels, "rest_seconds": rest,
            "rest_cut": (rest - (target - kernels)) / rest if rest > 0 else 0.0,
            "ratio_with_no_rest": theirs_seconds / kernels}


def measure(prompts: int, samples_per_prompt: int, max_new_tokens: int, ppo_epochs: int, minibatches: int,
            iterations: int, trl_dir: Path) -> dict:
    """The paired measurement in this process (its CPU, its threads, its environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, model_dir = bench_model_and_prompts(tmp, prompts, samples_per_prompt)
        trl = TRLProcess(trl_dir, model_dir, tmp / "prompts.json", max_new_tokens, ppo_epochs, minibatches,
                         tmp / "trl.log")
        try:
            ours = chemlit_iterations(data, model_dir, samples_per_prompt, max_new_tokens, ppo_epochs, minibatches,
                                      iterations, between=trl.iteration)
        finally:
            trl.close()
        theirs = trl.result()
    setup = {"model": "tiny Llama 3.5M, random weights", "prompts": prompts, "samples_per_prompt": samples_per_prompt,
             "samples_per_iteration": prompts * samples_per_prompt, "max_new_tokens": max_new_tokens,
             "ppo_epochs": ppo_epochs, "minibatches": minibatches, "timed_iterations": iterations,
             "torch_threads": torch.get_num_threads(), "order": "alternating: chemlit i, then TRL i",
             "machine": cpu_description(), "env": {k: os.environ[k] for k in AVX2_ENV if k in os.environ}}
    return summarize(setup, ours, theirs)


def run(out_dir: Path, trl_dir: Path, isa: str = "native", prompts: int = 16, samples_per_prompt: int = 8,
        max_new_tokens: int = 96, ppo_epochs: int = 2, minibatches: int = 4, iterations: int = 5,
        command: str = "", json_out: Optional[Path] = None) -> dict:
    """The native and/or AVX2-limited measurement, written to ``json_out`` or ``out_dir``/throughput.json."""
    ensure_trl(trl_dir)
    arguments = ["throughput", "--iterations", str(iterations), "--trl-dir", str(trl_dir)]
    return measure_on_cpu_kinds(isa, lambda: measure(prompts, samples_per_prompt, max_new_tokens, ppo_epochs,
                                                     minibatches, iterations, trl_dir),
                                arguments, json_out or out_dir / "throughput.json", command)
