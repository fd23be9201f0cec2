"""TRL 0.11.4's PPOTrainer on the same model, prompts and shapes as chemlit's PPO iteration.

Run by ``python -m chemlit.bench throughput`` as a separate process whose path holds TRL 0.11.4
(installed with ``--no-deps``: it is not a chemlit dependency). It loads the model, prints one
JSON line ``{"ready": ..., "trl_version": ...}``, then runs one PPO iteration for every line it reads
on standard input and prints one JSON line per iteration (its seconds, rollout seconds and mean
response length; for a "count" line also its matmul and attention GFLOP, for a "profile" line where its
time went). The benchmark asks for a TRL iteration right after each of chemlit's, so the two
are timed side by side, not minutes apart (this shared 2-core machine drifts by 20-30 % within
minutes). Each iteration is what a TRL user writes: ``ppo_trainer.generate`` (sampling, top_k=0,
top_p=1) then ``ppo_trainer.step(queries, responses, rewards)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from chemlit.bench.stages import FlopCount, time_by_kind


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists (one per sample)")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--ppo-epochs", type=int, required=True)
    parser.add_argument("--minibatches", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    answers, sys.stdout = sys.stdout, sys.stderr  # standard output carries only the JSON answers

    import trl
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.model)
    reference = AutoModelForCausalLMWithValueHead.from_pretrained(args.model)
    prompts = [torch.tensor(p) for p in json.loads(open(args.prompts).read())]
    batch = len(prompts)
    config = PPOConfig(batch_size=batch, mini_batch_size=batch // args.minibatches, ppo_epochs=args.ppo_epochs,
                       learning_rate=args.learning_rate, init_kl_coef=0.02, adap_kl_ctrl=False, kl_penalty="kl",
                       seed=args.seed, log_with=None)
    trainer = PPOTrainer(config, model, reference, tokenizer)
    gen_kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "min_length": -1,
                  "max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id}
    print(json.dumps({"ready": True, "trl_version": trl.__version__, "samples": batch}), file=answers, flush=True)
    while line := sys.stdin.readline():  # one iteration per line asked for; end of input ends the process
        what = line.strip()  # step: timed; count: its matmul FLOPs counted; profile: where its time goes
        counter = FlopCount() if what == "count" else nullcontext()
        profiler = profile(activities=[ProfilerActivity.CPU]) if what == "profile" else nullcontext()
        started = time.perf_counter()
        with counter, profiler:
            responses = trainer.generate(prompts, batch_size=batch, return_prompt=False, **gen_kwargs)
            rolled = time.perf_counter()
            # What chemlit's grader gives every answer of this random-weight model: the no-answer penalty.
            # (A length-dependent reward, len % 3 - 1, made TRL's answers shrink from 89 to 68 tokens
            # within 5 iterations while chemlit's stayed at 92: unequal work per sample.)
            rewards = [torch.tensor(-1.0) for _ in responses]
            trainer.step(prompts, responses, rewards)
        seconds = time.perf_counter() - started
        answer = {"seconds": seconds, "rollout_seconds": rolled - started,
                  "mean_response_length": sum(len(r) for r in responses) / batch}
        if what == "count":
            answer["gflop"] = counter.total / 1e9
        if what == "profile":
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in profiler.key_averages()}
            answer["profiled"] = {"seconds": seconds, "kinds": time_by_kind(ops, seconds)}
        print(json.dumps(answer), file=answers, flush=True)

if __name__ == "__main__":
    main()
