import json

import pytest
import torch

from chemlit.data.datamodule import IGNORE_INDEX, RationaleDataModule
from chemlit.data.prompts import ANSWER_MARKER
from chemlit.data.tokenizer import train_smiles_tokenizer


@pytest.fixture
def datamodule(tiny_table, tmp_path):
    def make(stage="sft", **kwargs):
        dm = RationaleDataModule(table=str(tiny_table), stage=stage, run_dir=str(tmp_path / "run"),
                                 batch_size=8, eval_batch_size=8, **kwargs)
        dm.setup()
        dm.tokenizer = train_smiles_tokenizer(dm.tokenizer_corpus(), vocab_size=512)
        return dm

    return make


def test_setup_writes_split_and_summary(datamodule, tmp_path):
    dm = datamodule()
    assert [len(dm.records[s]) for s in ("train", "val", "test")] == [128, 16, 16]
    assert (tmp_path / "run" / "splits.csv").exists()
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["splits"]["train"]["molecules"] == 128 and "median" in summary["splits"]["train"]


def test_split_file_gives_the_same_molecules(datamodule, tiny_table, tmp_path):
    first = datamodule(split="scaffold", seed=5)
    again = RationaleDataModule(table=str(tiny_table), split_file=str(tmp_path / "run" / "splits.csv"),
                                run_dir=str(tmp_path / "run2"))
    again.setup()
    for split in ("train", "val", "test"):
        assert [r.smiles for r in again.records[split]] == [r.smiles for r in first.records[split]]


def test_sft_batch_masks_the_prompt_and_pads(datamodule):
    dm = datamodule(pad_to_multiple_of=8)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.size(1) % 8 == 0
    for row in range(ids.size(0)):
        n_real = int(mask[row].sum())
        assert mask[row, :n_real].all() and not mask[row, n_real:].any()          # right padding
        assert (labels[row, n_real:] == IGNORE_INDEX).all()
        labelled = labels[row] != IGNORE_INDEX
        first = int(labelled.float().argmax())
        prompt_text = tok.decode(ids[row, :first], skip_special_tokens=True)
        answer_text = tok.decode(ids[row, first:n_real], skip_special_tokens=True)
        assert prompt_text.endswith("Rationale:")                                 # no loss on the prompt
        assert ANSWER_MARKER in answer_text and ANSWER_MARKER not in prompt_text
        assert labels[row, n_real - 1] == tok.eos_token_id                         # learns to stop
        answer = batch["answer_mask"][row].bool()
        assert tok.decode(ids[row][answer]).startswith("\n" + ANSWER_MARKER)      # the answer line...
        assert tok.decode(ids[row][answer], skip_special_tokens=True).strip().split(" ")[-1].lstrip("-").isdigit()
        assert (labels[row][answer] != IGNORE_INDEX).all()                      # ...is all labelled
    # Generation prompts are left-padded and end with the same prompt.
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    assert p_ids.size(1) % 8 == 0
    assert p_mask[:, -1].all()
    assert all(tok.decode(r, skip_special_tokens=True).endswith("Rationale:") for r in p_ids)
    assert torch.isfinite(batch["targets"]).all()


def test_no_rationale_ablation(datamodule):
    dm = datamodule(use_rationale=False)
    ex = dm.examples("train")[0]
    assert ex.completion.startswith("\n" + ANSWER_MARKER)


def test_cpt_blocks_are_packed_text_without_values(datamodule):
    dm = datamodule(stage="cpt", max_length=64)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 64) and batch["attention_mask"].all()
    text = dm.tokenizer.decode(dm.packed_blocks("train").flatten())
    assert ANSWER_MARKER not in text and text.count("Molecule:") == len(dm.records["train"])


def test_rl_batch_holds_prompts_and_targets(datamodule):
    dm = datamodule(stage="rl")
    batch = next(iter(dm.val_dataloader()))
    # and each molecule's written example, for PPO's rationale_anchor
    assert set(batch) == {"prompt_ids", "prompt_mask", "targets", "smiles", "rationale_ids", "rationale_mask",
                          "rationale_labels"}
    assert batch["prompt_ids"].shape[0] == batch["targets"].shape[0] == len(batch["smiles"])
    assert batch["rationale_ids"].shape == batch["rationale_labels"].shape
    plain = next(iter(datamodule(stage="rl", use_rationale=False).val_dataloader()))
    assert set(plain) == {"prompt_ids", "prompt_mask", "targets", "smiles"}


def test_skip_mode_writes_skipped_rows(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("smiles,mpC\n" + "".join(f"{'C' * (i + 1)}O,{i}\n" for i in range(10)) + "C1CC,5\n")
    dm = RationaleDataModule(table=str(table), on_invalid="skip", run_dir=str(tmp_path / "run"))
    dm.setup()
    lines = (tmp_path / "run" / "skipped_rows.csv").read_text().splitlines()
    assert len(lines) == 2 and ",12,invalid SMILES 'C1CC'" in lines[1]
