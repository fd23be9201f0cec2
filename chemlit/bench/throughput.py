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

import lightning as L
import torch

from chemlit.data.files import write_whole

TRL_INSTALL = "pip install --no-deps --target {trl_dir} trl==0.11.4 tyro docstring_parser shtab typeguard"


def ensure_trl(trl_dir: Path) -> Path:
    if not (trl_dir / "trl" / "__init__.py").exists():
        raise SystemExit(f"chemlit bench: TRL 0.11.4 is not in {trl_dir}; install it there first with\n  "
                         + TRL_INSTALL.format(trl_dir=trl_dir))
    return trl_dir


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


class IterationTimer(L.Callback):
    """Wall time and mean response length (tokens, end token included) of each PPO iteration; after each,
    ``between()`` runs untimed (the benchmark's TRL iteration)."""

    def __init__(self, between=None):
        self.seconds: list[float] = []
        self.lengths: list[float] = []
        self.between = between

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._started)
        self.lengths.append(float(trainer.callback_metrics["ppo/response_length"]))
        if self.between is not None:
            self.between()


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

    def iteration(self) -> None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        self.iterations.append(self._answer())

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait()
        self._stderr.close()

    def result(self) -> dict:
        """The timed iterations (the first is the warm-up), in the shape ``summarize`` reads."""
        timed = self.iterations[1:]
        return {"trl_version": self.version, "samples": self.samples,
                "seconds_per_iteration": [i["seconds"] for i in timed],
                "rollout_seconds": [i["rollout_seconds"] for i in timed],
                "mean_response_length": [i["mean_response_length"] for i in timed]}


def chemlit_iterations(data, model_dir: Path, samples_per_prompt: int, max_new_tokens: int, ppo_epochs: int,
                       minibatches: int, iterations: int, between=None) -> dict:
    """chemlit's PPO iterations (the first a warm-up), ``between()`` after each; then rollout and generate alone."""
    from chemlit.models.factory import ModelSpec
    from chemlit.rl.kl import KLSpec
    from chemlit.stages.ppo import PPOModule, PPOSpec

    L.seed_everything(0)
    module = PPOModule(model=ModelSpec(source="pretrained", path=str(model_dir)), learning_rate=1e-4,
                       ppo=PPOSpec(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                                   ppo_epochs=ppo_epochs, num_minibatches=minibatches),
                       kl=KLSpec(coef=0.02, kind="k1"))
    timer = IterationTimer(between)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=iterations + 1,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
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
    return {"seconds_per_iteration": timer.seconds[1:], "mean_response_length": timer.lengths[1:],
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
    return {"setup": setup, "chemlit": ours, "trl": theirs, "paired_ratios": paired,
            "ratio_chemlit_over_trl": statistics.median(paired),
            "ratio_of_median_samples_per_second": ours["samples_per_second"] / theirs["samples_per_second"]}


def cpu_description() -> str:
    """The machine as the ratio depends on it: the bench report's machine line, the vector ISA torch uses, bf16 units."""
    from chemlit.bench.machine import machine
    from chemlit.hardware import cpu_facts

    facts = cpu_facts()
    return f"{machine()}, {facts.aten_capability}, {'with' if facts.has_bf16_units else 'no'} bf16 units, fp32"


def run(out_dir: Path, trl_dir: Path, prompts: int = 16, samples_per_prompt: int = 8, max_new_tokens: int = 96,
        ppo_epochs: int = 2, minibatches: int = 4, iterations: int = 5) -> dict:
    ensure_trl(trl_dir)
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
             "machine": cpu_description()}
    summary = summarize(setup, ours, theirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_whole(out_dir / "throughput.json", json.dumps(summary, indent=2) + "\n")
    return summary
