"""The PPO stage end to end on tiny models: sampling, a toy task it must learn, robustness, resume,
the exact first ratio, plain against fast decoding, the CLI config, and the walkthrough notebook
(DDP on two CPU processes: tests/test_ddp.py)."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from chemlit.cli import main
from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.tokenizer import train_smiles_tokenizer
from chemlit.models.factory import ModelSpec, TinyConfig, build_tiny, export_model
from chemlit.rl.curriculum import CurriculumSpec
from chemlit.rl.kl import KLSpec
from chemlit.data.prompts import ANSWER_MARKER
from chemlit.rl.rewards import RewardSpec, ScoredAnswers
from chemlit.stages.ppo import PPOModule, PPOSpec, response_mask_from_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


def test_response_mask_stops_after_the_first_end_token():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    mask, finished = response_mask_from_tokens(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


class DigitPPO(PPOModule):
    """A toy task: the score is the share of sampled tokens that are digits (about 1 in 15 at first)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.raw_scores: list[float] = []

    def score(self, rollout):
        digits = torch.tensor([i for i in range(len(self.tokenizer)) if self.tokenizer.decode([i]).strip().isdigit()])
        mask = rollout.response_mask
        share = (torch.isin(rollout.responses, digits) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        self.raw_scores.append(share.mean().item())
        n = share.numel()
        return ScoredAnswers(share.float(), [None] * n, [None] * n, (share > 0.5).tolist())


def tiny_ppo(cls=PPOModule, **overrides) -> PPOModule:
    ppo = dict(samples_per_prompt=4, max_new_tokens=8, ppo_epochs=1, num_minibatches=1)
    ppo.update(overrides.pop("ppo", {}))
    kwargs = dict(model=ModelSpec(source="tiny", tiny=TINY), learning_rate=3e-3, ppo=PPOSpec(**ppo),
                  curriculum=CurriculumSpec(window=16), val_generate_limit=8, val_max_new_tokens=8)
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_data(table, tmp_path, **overrides) -> RationaleDataModule:
    kwargs = dict(table=str(table), stage="rl", batch_size=4, eval_batch_size=8, run_dir=str(tmp_path / "data"))
    kwargs.update(overrides)
    return RationaleDataModule(**kwargs)


def trainer(tmp_path, **overrides) -> L.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, max_epochs=1, limit_val_batches=0,
                  default_root_dir=str(tmp_path))
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def test_toy_task_ppo_raises_the_reward(tiny_table, tmp_path):
    L.seed_everything(0)
    module = tiny_ppo(DigitPPO, ppo=dict(samples_per_prompt=8, ppo_epochs=2, num_minibatches=2))
    trainer(tmp_path, limit_train_batches=25).fit(module, tiny_data(tiny_table, tmp_path))
    first, last = module.raw_scores[:5], module.raw_scores[-5:]
    assert len(module.raw_scores) == 25
    # digits start as a small share of the sampled tokens and become most of them
    assert sum(last) / 5 > sum(first) / 5 + 0.3, module.raw_scores
    assert module.skipped_minibatches == 0
    assert module.iteration == 25
    assert module.value_head.summary.weight.abs().sum() > 0  # the critic learned something


class KeepRollout(PPOModule):
    def score(self, rollout):
        self.last_rollout = rollout
        return super().score(rollout)


def test_greedy_rationale_samples_only_the_answer_line_and_learns_against_the_greedy_answer(tiny_table, tmp_path):
    L.seed_everything(0)
    module = tiny_ppo(KeepRollout, ppo=dict(rationale="greedy", max_new_tokens=12, answer_max_new_tokens=4),
                      reward=RewardSpec(normalize="greedy"))
    before = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer(tmp_path, limit_train_batches=2, callbacks=[Snapshot()]).fit(module, tiny_data(tiny_table, tmp_path))
    rollout = module.last_rollout
    G, K = rollout.prefix_ids.size(0), rollout.group_size
    assert rollout.responses.size(0) == G * K and rollout.responses.size(1) <= 4  # only the answer line
    for g in range(G):  # each prefix is the prompt, the greedy rationale and the answer marker
        prefix = module.tokenizer.decode(rollout.prefix_ids[g][rollout.prefix_mask[g].bool()], skip_special_tokens=True)
        assert prefix.startswith("Molecule:") and prefix.endswith(ANSWER_MARKER), prefix
    assert all(ANSWER_MARKER in text for text in rollout.texts)
    assert len(rollout.greedy_texts) == G and module.score_greedy(rollout).rewards.shape == (G,)
    assert module.iteration == 2 and module.skipped_minibatches == 0
    assert any(not torch.equal(v, before[k]) for k, v in module.model.state_dict().items())  # it trained
    with pytest.raises(ValueError, match="rationale"):
        tiny_ppo(ppo=dict(rationale="none"))


def test_non_finite_loss_skips_the_minibatch_and_keeps_the_weights(tiny_table, tmp_path):
    L.seed_everything(0)
    module = tiny_ppo(ppo=dict(vf_coef=math.nan, num_minibatches=2))
    data = tiny_data(tiny_table, tmp_path)
    fit = trainer(tmp_path, limit_train_batches=2)
    before = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    fit.callbacks.append(Snapshot())
    fit.fit(module, data)
    assert module.skipped_minibatches == 4  # 2 iterations x 2 minibatches, all NaN
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_resumed_run_matches_an_uninterrupted_one(tiny_table, tmp_path):
    """4 iterations straight vs 2 + resume + 2 (mid-epoch: the epoch has 40 batches)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, directory, ckpt_path=None):
        L.seed_everything(0)
        module = tiny_ppo(kl=KLSpec(controller="adaptive", coef=0.05, target=0.1, horizon=64))
        fit = trainer(directory, max_steps=max_steps, max_epochs=-1, enable_checkpointing=True,
                      callbacks=[ModelCheckpoint(dirpath=directory / "ckpt", save_last=True, every_n_train_steps=1)])
        fit.fit(module, tiny_data(tiny_table, directory), ckpt_path=ckpt_path)
        return module

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert straight.kl_ctl.value != 0.05  # the adaptive controller moved...
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value)  # ...and the resumed one the same way
    assert resumed.curriculum.state_dict() == straight.curriculum.state_dict()
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def tiny_sft_export(directory: Path, table: Path) -> Path:
    """A tiny untrained 'SFT export' with a tokenizer trained on the table: what ppo.yaml starts from."""
    data = RationaleDataModule(table=str(table), stage="rl", run_dir=str(directory / "data"))
    data.setup("fit")
    tokenizer = train_smiles_tokenizer(data.tokenizer_corpus(), vocab_size=TINY.vocab_size)
    model = build_tiny(TINY, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return export_model(model, tokenizer, directory / "sft-export", {"stage": "sft"})


def test_quickstart_ppo_config_runs_through_the_cli(tiny_table, tmp_path):
    from test_cli import read_scalars, read_tags

    export = tiny_sft_export(tmp_path, tiny_table)
    main(["fit", "--config", str(ROOT / "configs" / "quickstart" / "ppo.yaml"),
          "--model.init_args.model.path", str(export), "--data.table", str(tiny_table),
          "--data.split_file", "null", "--data.run_dir", str(tmp_path / "rl-data"),
          "--data.batch_size", "2", "--data.eval_batch_size", "8",
          "--model.init_args.ppo.samples_per_prompt", "2", "--model.init_args.ppo.max_new_tokens", "8",
          "--model.init_args.val_generate_limit", "8", "--model.init_args.val_max_new_tokens", "8",
          "--model.init_args.export_dir", str(tmp_path / "ppo-export"),
          "--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "1",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])
    run = next((tmp_path / "runs" / "quickstart-ppo").glob("version_*"))
    scalars = read_scalars(run)
    for tag in ("ppo/score_mean", "ppo/score_std", "ppo/sample_mae", "ppo/parse_rate", "ppo/kl_per_sequence",
                "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/entropy", "ppo/explained_variance", "ppo/response_length", "ppo/harshness_level",
                "ppo/samples_per_second", "ppo/old_approx_kl", "curriculum/score_mean_100C",
                "curriculum/success_rate_100C", "val/mae", "val/parse_rate"):
        assert tag in scalars, tag
    assert len(scalars["ppo/score_mean"]) == 3
    assert "hp_metric" not in scalars  # no placeholder card
    tensors = read_tags(run, "tensors")
    assert "ppo/samples/text_summary" in tensors
    assert "custom_scalars__config__" in tensors  # the PPO layout of TensorBoard's Custom Scalars tab
    assert "val/parity" in read_tags(run, "images")  # PPO's validation draws the parity plot SFT draws
    assert (tmp_path / "ppo-export" / "model.safetensors").exists()
    info = json.loads((tmp_path / "ppo-export" / "chemlit_export.json").read_text())
    assert info["stage"] == "ppo" and info["curriculum_history"][0] == [0, 0]


@pytest.mark.slow
def test_walkthrough_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "ppo_walkthrough.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "policy loss" in outputs and "GAE advantages" in outputs
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if o.get("output_type") == "error"]
    assert not errors


class FirstMinibatch(PPOModule):
    """Keeps the statistics of each iteration's first update: before it nothing has moved."""

    def training_step(self, batch, batch_idx):
        self.first_in_iteration = True
        return super().training_step(batch, batch_idx)

    def update(self, rollout, groups):
        stats = super().update(rollout, groups)
        if self.first_in_iteration:
            self.first_stats = getattr(self, "first_stats", []) + [stats]
            self.first_in_iteration = False
        return stats


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_first_minibatch_ratio_is_exactly_one(tiny_table, tmp_path, precision):
    """Old log-probs and values come from the forward the update runs, on the same minibatch: the first
    minibatch of every iteration sees ratio 1 and old_approx_kl 0 exactly, in fp32 and under autocast."""
    L.seed_everything(0)
    module = tiny_ppo(FirstMinibatch, ppo=dict(num_minibatches=2, ppo_epochs=2))
    trainer(tmp_path, limit_train_batches=3, precision=precision).fit(module, tiny_data(tiny_table, tmp_path))
    assert len(module.first_stats) == 3
    for stats in module.first_stats:
        assert stats["ratio_mean"].item() == 1.0 and stats["old_approx_kl"].item() == 0.0
        assert stats["clipfrac"].item() == 0.0


class KeepEvaluated(PPOModule):
    def advantages(self, rollout, token_rewards):
        self.evaluated = rollout
        return super().advantages(rollout, token_rewards)


def test_plain_decoding_gives_the_fast_paths_tokens_and_logprobs(tiny_table, tmp_path):
    """ppo.decoding: plain (generate + one ordinary forward) against the default fast path, from the same
    seed: the same sampled tokens, old log-probs, values and reference log-probs (fp32, 1e-5)."""
    rollouts = {}
    for decoding in ("fast", "plain"):
        L.seed_everything(0)
        module = tiny_ppo(KeepEvaluated, ppo=dict(decoding=decoding, rationale="greedy", max_new_tokens=10,
                                                  answer_max_new_tokens=4))
        trainer(tmp_path / decoding, limit_train_batches=1).fit(module, tiny_data(tiny_table, tmp_path / decoding))
        rollouts[decoding] = module.evaluated
    fast, plain = rollouts["fast"], rollouts["plain"]
    assert torch.equal(fast.prefix_ids, plain.prefix_ids) and torch.equal(fast.responses, plain.responses)
    for name in ("logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), rtol=1e-5, atol=1e-5, msg=name)


def test_minibatches_split_the_molecules_evenly_and_the_reference_is_not_checkpointed(tiny_table, tmp_path):
    module = tiny_ppo(ppo=dict(num_minibatches=3, ppo_epochs=2))
    fit = trainer(tmp_path, limit_train_batches=1)
    fit.fit(module, tiny_data(tiny_table, tmp_path))
    plan = module.minibatch_plan(10)
    assert len(plan) == 2 and all(len(epoch) == 3 for epoch in plan)
    for epoch in plan:   # 10 molecules in 3 minibatches: 4, 3, 3 -- never a 1-molecule straggler
        assert sorted(len(m) for m in epoch) == [3, 3, 4] and sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert len(module.minibatch_plan(2)[0]) == 2  # fewer molecules than minibatches: one molecule each
    assert not any(name.startswith("reference") for name in module.state_dict())  # rebuilt on resume, not stored
    assert module.reference.training is False and not any(p.requires_grad for p in module.reference.parameters())


def test_a_nan_gradient_with_a_finite_loss_is_skipped_and_counted(tiny_table, tmp_path):
    """A gradient that is NaN while the loss is finite (a hook poisons the value head's gradient) never
    reaches the weights: every minibatch is skipped and counted, the weights stay as they were."""
    L.seed_everything(0)
    module = tiny_ppo(ppo=dict(num_minibatches=2))
    before = {}

    class PoisonGradients(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})
            pl_module.value_head.summary.bias.register_hook(lambda grad: grad * float("nan"))

    trainer(tmp_path, limit_train_batches=2, callbacks=[PoisonGradients()]).fit(module, tiny_data(tiny_table, tmp_path))
    assert module.skipped_minibatches == 4
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_rationale_anchor_holds_the_model_to_its_written_rationales(tiny_table, tmp_path):
    """ppo.rationale_anchor adds the written rationale's negative log-likelihood to every minibatch's loss:
    the labels are exactly the written rationale (not the prompt, not the answer line), and the same PPO
    run makes those rationales far more likely with the anchor than without it."""
    from types import SimpleNamespace

    from chemlit.data.datamodule import IGNORE_INDEX
    from chemlit.data.rationale import write_rationale

    nll = {}
    for anchor in (0.0, 1.0):
        L.seed_everything(0)
        module = tiny_ppo(ppo=dict(rationale="greedy", max_new_tokens=8, answer_max_new_tokens=4,
                                   ppo_epochs=2, rationale_anchor=anchor))
        data = tiny_data(tiny_table, tmp_path / str(anchor), rationale_style="compact")
        trainer(tmp_path / str(anchor), limit_train_batches=8).fit(module, data)
        batch = data.collate_rl(data.examples("train")[:8])
        labels = batch["rationale_labels"]
        for i, smiles in enumerate(batch["smiles"]):  # the labelled tokens are the written rationale, whole
            written = module.tokenizer.decode(labels[i][labels[i] != IGNORE_INDEX], skip_special_tokens=True)
            assert written.strip() == write_rationale(smiles, "compact").strip()
        held = SimpleNamespace(written_ids=batch["rationale_ids"], written_mask=batch["rationale_mask"],
                               written_labels=labels)
        with torch.no_grad():
            logprobs, mask = module.written_logprobs(held, torch.arange(8))
        nll[anchor] = -(logprobs * mask).sum().item() / mask.sum().item()
    assert nll[1.0] < nll[0.0] - 1.0, nll
    with pytest.raises(ValueError, match="rationale_anchor"):
        tiny_ppo(ppo=dict(rationale_anchor=-1.0))
