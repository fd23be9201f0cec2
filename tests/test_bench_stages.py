"""bench stages: the FLOPs of a step are counted over the whole step, the peak is weighted by the FLOPs of the
shapes it was measured on, and the table's % of peak is achieved / peak (chemlit/bench/stages.py)."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from chemlit.bench.stages import FlopCount, SameBatch, StepClock, matmul_peak, stages_markdown, time_matmul

M, K, N = 6, 8, 5  # a (M, K) batch through Linear(K, N)


def test_a_linear_forward_counts_two_m_k_n_flops_at_its_shape():
    layer = torch.nn.Linear(K, N)
    with FlopCount() as count:
        layer(torch.randn(M, K))
    assert count.total == 2 * M * K * N
    assert dict(count.shapes) == {(1, M, K, N): [2 * M * K * N, 1]}
    assert dict(count.passes) == {"forward": 2 * M * K * N}


class OneLinear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(K, N)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_the_counted_step_holds_forward_and_backward_of_one_whole_step(tmp_path):
    # The counted step of the StepClock (after one warm-up) is a whole optimizer step: forward x W^T
    # (2 M K N) and the weight's gradient grad^T x (2 N M K; the input needs no gradient). Counting only
    # training_step, or a warm-up and the counted step together, gives another number.
    clock = StepClock(warmup=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], default_root_dir=str(tmp_path))
    trainer.fit(OneLinear(), train_dataloaders=SameBatch({"x": torch.randn(M, K)}, 4))
    assert clock.count.total == 2 * M * K * N + 2 * N * M * K
    assert dict(clock.count.passes) == {"forward": 2 * M * K * N, "backward": 2 * N * M * K}
    assert clock.count.by_layer() == {"Linear": 2 * M * K * N}  # a module called on its own: its class name
    assert len(clock.seconds) == 2 and all(s > 0 for s in clock.seconds)  # 4 steps: warm-up, counted, 2 timed


def test_cpu_attention_is_counted_with_torchs_attention_formulas():
    # FlopCounterMode alone counts the CPU attention kernel as 0 FLOPs
    q, k, v = (torch.randn(2, 3, 7, 4, requires_grad=True) for _ in range(3))
    with FlopCount() as count:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in count.by_op()
    expected = sdpa_flop_count(q.shape, k.shape, v.shape) + sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)
    assert count.total == expected > 0
    assert sum(f for f, _ in count.shapes.values()) == expected  # every counted FLOP has its matmul shape


def test_the_peak_is_the_flop_weighted_harmonic_mean_of_the_shapes_that_carry_the_flops():
    rates = {(1, 64, 64, 64): 100e9, (1, 8, 8, 8): 10e9}  # FLOP/s of each shape, alone
    shapes = {(1, 64, 64, 64): [6e9, 2], (1, 8, 8, 8): [3.5e9, 1], (1, 2, 2, 2): [0.5e9, 5]}

    def seconds_of(shape):  # one call
        if shape not in rates:
            raise AssertionError("shapes beyond 90 % of the FLOPs are not timed")
        return shapes[shape][0] / shapes[shape][1] / rates[shape]

    peak = matmul_peak(shapes, coverage=0.9, seconds_of=seconds_of)
    # 9.5 GFLOP in 6/100 + 3.5/10 s: 23.2 GFLOP/s (unweighted mean of the rates: 55; FLOP-weighted arithmetic: 66.8)
    assert peak["gflops_per_s"] == pytest.approx(9.5 / (6 / 100 + 3.5 / 10))
    assert peak["coverage"] == pytest.approx(0.95)
    assert [s["gflops_per_s"] for s in peak["shapes"]] == pytest.approx([100, 10])


def test_the_peak_timer_measures_positive_finite_rates():
    shapes = {(1, 16, 32, 8): [2 * 16 * 32 * 8 * 3, 3], (4, 8, 8, 8): [2 * 4 * 8 * 8 * 8, 1]}
    peak = matmul_peak(shapes, coverage=1.0, seconds_of=lambda s: time_matmul(s, trials=2, min_seconds=0.002))
    assert len(peak["shapes"]) == 2 and peak["coverage"] == 1.0
    rates = [s["gflops_per_s"] for s in peak["shapes"]]
    assert all(0 < r < math.inf for r in rates)
    assert min(rates) <= peak["gflops_per_s"] <= max(rates)


def stage(name, unit, throughput, achieved, peak, flops=2e9, seconds=0.5):
    result = {"stage": name, "unit": unit, "throughput": throughput, "median_step_seconds": seconds,
              "flops_per_step": flops, "achieved_gflops_per_s": achieved,
              "peak": {"gflops_per_s": peak, "coverage": 0.93, "distinct_shapes": 12,
                       "shapes": [{"shape": [1, 10240, 256, 704], "gflops_per_s": peak}]},
              "flops_by_layer": {"up_proj": 3, "self_attn": 1}, "flops_by_pass": {"forward": 1, "backward": 2}}
    if name == "ppo":
        result.update(batch={"molecules": 16, "samples": 128}, ppo={"samples_per_prompt": 8},
                      counted_rollout={"prefix_length": 150, "response_tokens": 1024, "samples": 128},
                      phases={"rollout": {"seconds": 2.0, "flops": 1e9, "gflops_per_s": 0.5},
                              "score": {"seconds": 0.1, "flops": 0, "gflops_per_s": 0.0}})
    else:
        result["batch"] = {"rows": 32, "length": 320, "tokens": 10240}
    if name == "sft":
        result["tokens_per_s"] = 5000.0
    return result


def test_the_table_has_one_row_per_stage_with_percent_of_peak_achieved_over_peak():
    run = {"kind": "native", "cpu": "x86_64, AVX512", "env": {}, "machine": "x86_64, 2 cores, torch 2.x (1 threads)",
           "aten_capability": "AVX512", "steps": 3, "warmup": 1, "small": False,
           "stages": {"cpt": stage("cpt", "tokens/s", 2048.0, 30.0, 120.0),
                      "sft": stage("sft", "molecules/s", 12.5, 45.0, 150.0),
                      "ppo": stage("ppo", "samples/s", 9.1, 12.0, 150.0)}}
    avx2 = dict(run, kind="AVX2", env={"ATEN_CPU_CAPABILITY": "avx2"})
    text = stages_markdown({"command": "python -m chemlit.bench stages --isa both", "date": "2026-12-04",
                            "runs": [run, avx2]})
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [r.split(" | ")[0] for r in rows] == ["| cpt", "| sft", "| ppo"] * 2  # one block per CPU kind
    percent = [r.rstrip(" |").rsplit("| ", 1)[-1] for r in rows[:3]]
    assert percent == ["25 %", "30 %", "8 %"]  # 30/120, 45/150, 12/150
    assert "| cpt | 2,048 tokens/s | 0.500 | 2.00 | 30.0 | 120.0 | 25 % |" in rows
    assert "| sft | 12.5 molecules/s (5,000 tokens/s) |" in rows[1]
    assert "Machine: x86_64, 2 cores, torch 2.x (1 threads)" in text
    assert "`python -m chemlit.bench stages --isa both`" in text
    assert "under `ATEN_CPU_CAPABILITY=avx2`" in text


def test_a_profiled_steps_time_is_split_into_matmuls_attention_other_ops_and_what_lies_outside_ops():
    from chemlit.bench.stages import time_by_kind

    ops = {"aten::mm": 1.0, "aten::addmm": 0.5, "aten::bmm": 0.25, "aten::_scaled_dot_product_flash_attention_for_cpu": 0.5,
           "aten::mul": 0.25, "aten::cat": 0.5,
           # profiler ranges, not ops: their self time is Python / engine overhead, left to "outside ops"
           "Optimizer.step#AdamW.step": 0.125, "autograd::engine::evaluate_function: MmBackward0": 0.125}
    kinds = time_by_kind(ops, wall_seconds=4.0)
    assert kinds == {"matmul": 1.75, "attention": 0.5, "other ops": 0.75, "outside ops": 1.0}
    assert sum(kinds.values()) == 4.0


def test_the_profiled_step_is_neither_counted_nor_timed(tmp_path):
    # warm-up, counted, profiled, then 2 timed: 5 steps. The profiled step's matmul self time is positive.
    clock = StepClock(warmup=1, profile=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=5, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], default_root_dir=str(tmp_path))
    trainer.fit(OneLinear(), train_dataloaders=SameBatch({"x": torch.randn(M, K)}, 5))
    assert len(clock.seconds) == 2
    assert clock.count.total == 2 * M * K * N + 2 * N * M * K  # the counted step alone, not the profiled one
    assert clock.profiled["kinds"]["matmul"] > 0 and clock.profiled["seconds"] > 0
    assert abs(sum(clock.profiled["kinds"].values()) - clock.profiled["seconds"]) < 1e-9
