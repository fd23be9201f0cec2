"""Runs launched by tests/test_ddp.py as `python tests/ddp_runs.py <out_dir> <what>`: real Lightning fits on
two CPU processes (gloo). Lightning's DDP launcher starts rank 1 by running this same script, so every
rank runs each fit below and writes what it saw to <out_dir>/<run>-rank<R>.json."""

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_ppo_stage import DigitPPO, tiny_data, tiny_ppo, trainer  # noqa: E402

from chemlit.models.factory import ModelSpec, TinyConfig  # noqa: E402
from chemlit.stages.cpt import CPTModule  # noqa: E402
from chemlit.stages.sft import SFTModule  # noqa: E402

TABLE = Path(__file__).parent / "data" / "tiny_mp.csv"
TINY = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


def checksum(module) -> float:
    return sum(p.double().sum().item() for p in module.parameters())


class RecordingPPO(DigitPPO):
    """The digit toy task (scores that differ), recording each iteration's molecules and sampled tokens, the
    scaled advantages' sums, and the weights after every update."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen, self.checksums, self.advantage_sums, self.responses = [], [], [], []

    def rollout(self, batch):
        self.seen.append(list(batch["smiles"]))
        rollout = super().rollout(batch)
        self.responses.append(rollout.responses.tolist())
        return rollout

    def advantages(self, rollout, token_rewards):
        super().advantages(rollout, token_rewards)
        mask = rollout.response_mask.float()
        a = rollout.advantages
        self.advantage_sums.append([(a * mask).sum().item(), (a ** 2 * mask).sum().item(), mask.sum().item()])

    def update(self, rollout, groups):
        stats = super().update(rollout, groups)
        self.checksums.append(checksum(self.model) + checksum(self.value_head))
        return stats


class SamePromptsPPO(RecordingPPO):
    """Both ranks roll out rank 0's molecules: only their random streams can make the samples differ."""

    def training_step(self, batch, batch_idx):
        return super().training_step(self.trainer.strategy.broadcast(batch, src=0), batch_idx)


class RecordingSFT(SFTModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["smiles"]))
        return super().training_step(batch, batch_idx)


class RecordingCPT(CPTModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append([" ".join(map(str, row.tolist())) for row in batch["input_ids"]])
        return super().training_step(batch, batch_idx)


def dump(out: Path, name: str, fit: L.Trainer, **values) -> None:
    (out / f"{name}-rank{fit.global_rank}.json").write_text(json.dumps({"world": fit.world_size, **values}))


def ppo_runs(out: Path) -> None:
    """4 iterations straight; 2 iterations then a resume to 4 (all mid-epoch: an epoch is 16 iterations)."""
    def run(name, max_steps, ckpt_path=None):
        L.seed_everything(0)
        module = tiny_ppo(RecordingPPO)
        fit = trainer(out / name, strategy="ddp", devices=2, max_steps=max_steps, max_epochs=-1,
                      enable_checkpointing=True,
                      callbacks=[ModelCheckpoint(dirpath=out / name / "ckpt", save_last=True, every_n_train_steps=1)])
        fit.fit(module, tiny_data(TABLE, out / name), ckpt_path=ckpt_path)
        dump(out, name, fit, seen=module.seen, checksums=module.checksums, advantage_sums=module.advantage_sums,
             curriculum=module.curriculum.state_dict(), beta=module.kl_ctl.value, responses=module.responses)

    run("straight", 4)
    run("first-half", 2)
    run("resumed", 4, ckpt_path=str(out / "first-half" / "ckpt" / "last.ckpt"))
    L.seed_everything(0)
    module = tiny_ppo(SamePromptsPPO)
    fit = trainer(out / "same-prompts", strategy="ddp", devices=2, max_steps=1, max_epochs=-1)
    fit.fit(module, tiny_data(TABLE, out / "same-prompts"))
    dump(out, "same-prompts", fit, seen=module.seen, responses=module.responses)


def sft_and_cpt_runs(out: Path) -> None:
    for name, cls, stage in (("sft", RecordingSFT, "sft"), ("cpt", RecordingCPT, "cpt")):
        L.seed_everything(0)
        module = cls(model=ModelSpec(source="tiny", tiny=TINY), warmup_steps=1)
        data = tiny_data(TABLE, out / name, stage=stage, max_length=48)
        fit = trainer(out / name, strategy="ddp", devices=2, limit_train_batches=3)
        fit.fit(module, data)
        dump(out, name, fit, seen=module.seen, checksum=checksum(module.model))


if __name__ == "__main__":
    {"ppo": ppo_runs, "sft_cpt": sft_and_cpt_runs}[sys.argv[2]](Path(sys.argv[1]))
