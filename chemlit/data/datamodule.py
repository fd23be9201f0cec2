"""RationaleDataModule: table -> records -> split -> prompts -> token batches, for every stage.

``stage`` picks what the batches hold:

* ``cpt``: packed raw text (molecule descriptions and rationales, no target values) in blocks;
* ``sft``: prompt + completion with labels masked (-100) on the prompt and the padding, plus the
  prompt alone, left-padded, for generation in validation/test;
* ``rl``:  left-padded prompts plus their measured targets.

The tokenizer comes from the stage's model (``datamodule.tokenizer`` is set by the stage in its
``setup``), so one table serves any model. All padding is done here by hand, not by the tokenizer,
so that padding sides cannot silently change (see DESIGN.md's traps): training batches are
right-padded, generation prompts are left-padded, and lengths are rounded up to
``pad_to_multiple_of`` (8 suits fp16 tensor cores and 8-bit kernels).
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from chemlit.data.analogues import REFERENCE_FILE, Analogue, ReferenceSet
from chemlit.data.estimates import ESTIMATOR_FILE, DescriptorEstimator
from chemlit.data.files import run_directory, write_csv
from chemlit.data.prompts import (
    ANSWER_MARKER,
    analogue_sentence,
    render_completion,
    render_prompt,
)
from chemlit.data.rationale import RationaleStyle, written_rationales
from chemlit.data.records import (
    ColumnMap,
    OnInvalid,
    Record,
    Skipped,
    randomized_smiles,
    read_table,
)
from chemlit.data.sources import ensure_melting_points
from chemlit.data.splits import SplitKind, make_split, read_split, write_split

log = logging.getLogger(__name__)

Stage = Literal["cpt", "sft", "rl"]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    smiles: str
    prompt: str
    completion: str
    target: Optional[float]
    name: str = ""


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad_right(sequences: list[list[int]], value: int, multiple: Optional[int]) -> torch.Tensor:
    width = _round_up(max(len(s) for s in sequences), multiple)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def pad_left(sequences: list[list[int]], value: int, multiple: Optional[int]) -> torch.Tensor:
    width = _round_up(max(len(s) for s in sequences), multiple)
    return torch.tensor([[value] * (width - len(s)) + s for s in sequences], dtype=torch.long)


def cpt_text(record: Record, rationale: str) -> str:
    """Continued-pre-training text for a molecule: what it is and why it behaves so; no value."""
    who = f"{record.name} ({record.smiles})" if record.name else record.smiles
    return f"Molecule: {who}\n{rationale}"


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` over a ``DistributedSampler``: each rank its own shard of a
    seeded shuffle, and Lightning saves the loader's position in checkpoints and restores it on resume.

    Two things its saved state adds, each found by resuming real runs (tests/test_ddp.py and
    tests/test_ppo_stage.py): the sampler's epoch (Lightning makes the resumed iterator before it sets
    the epoch, so a run resumed in its second epoch replayed the first epoch's order), and a position
    at the very end of an epoch resumes at the start of the next (restored as "all batches yielded",
    the next epoch came out empty and the run skipped a whole epoch).
    """

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sampler_epoch": self.sampler.epoch}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        epoch = state.pop("sampler_epoch")
        if state["_num_yielded"] >= len(self):   # the epoch was over: start the next one from its first batch
            self.sampler.set_epoch(epoch + 1)
            return
        self.sampler.set_epoch(epoch)
        super().load_state_dict(state)


class RationaleDataModule(L.LightningDataModule):
    def __init__(
        self,
        table: str = "builtin",
        columns: ColumnMap = ColumnMap(),
        on_invalid: OnInvalid = "error",
        duplicate_tolerance_c: float = 5.0,
        stage: Stage = "sft",
        split: SplitKind = "random",
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        holdout_source: Optional[str] = None,
        split_file: Optional[str] = None,
        seed: int = 0,
        max_molecules: Optional[int] = None,
        use_rationale: bool = True,
        rationale_style: RationaleStyle = "full",
        analogues: int = 0,
        descriptor_estimate: bool = False,
        cpt_replay_ratio: float = 0.0,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 320,
        pad_to_multiple_of: Optional[int] = None,
        num_workers: int = 0,
        run_dir: Optional[str] = None,
        predict_split: Literal["train", "val", "test", "all"] = "test",
    ):
        """
        Args:
            table: "builtin" (melting points from the `chemicals` package, built once and cached)
                or a path to a CSV / TSV / JSONL / Parquet file or a Hugging Face datasets directory.
            columns: which column holds SMILES, target, rationale and name, and the target's unit;
                left empty, columns are found by their usual names (smiles, mpC, Reason, name...).
            on_invalid: "error" stops at the first bad row with a one-line message; "skip" drops bad
                rows, counts them, and writes them to skipped_rows.csv in the run directory.
            duplicate_tolerance_c: duplicates of a molecule whose values differ by more than this
                (°C) are a conflict; closer ones are merged into their mean.
            stage: what batches hold: cpt (packed text), sft (prompt+completion), rl (prompts+targets).
            split: "random", "scaffold" (Bemis-Murcko groups never cross splits) or "source" (the
                molecules of ``holdout_source`` are the test set: an out-of-source test).
            split_fractions: train, val, test shares (split=source uses only the train:val ratio).
            holdout_source: split=source only: the table's source whose molecules are tested on
                ("wikidata" in the built-in table; a ``source`` column in your own).
            split_file: a splits.csv from an earlier run; overrides split/split_fractions/seed so every
                stage sees the same molecules. Molecules not in the file are left out.
            seed: seed of the split, of subsampling and of the training order (a shuffle per epoch).
            max_molecules: use a seeded random subset of this many molecules (quick runs, tests).
            use_rationale: False trains the answer straight after the prompt (the rationale ablation).
            rationale_style: how rows without their own rationale get one written: "full" sentences
                with each fact's effect, or "compact" counts and names (fewer tokens per molecule).
            analogues: put the k most similar training molecules (Morgan fingerprints, Tanimoto) with
                their measured values in every prompt, and their weighted mean in the rationale; 0 =
                off. Retrieved from the training split only, never a molecule's own row; a model
                trained with them carries that reference set in its export for ``predict``.
            descriptor_estimate: put a gradient-boosting model's estimate (RDKit descriptors, fitted on
                the training split; out-of-fold for training molecules, so never from a molecule's
                own value) in every prompt. A model trained with it carries the estimator in its
                export for ``predict`` (``chemlit.data.estimates``).
            cpt_replay_ratio: SFT only: add this many CPT texts per SFT example to the training set
                (loss on all their tokens), the replay remedy against forgetting CPT knowledge.
            batch_size: training batch size.
            eval_batch_size: batch size for validation, test and predict (generation).
            max_length: longest training sequence in tokens; longer ones are truncated at the end.
            pad_to_multiple_of: round padded lengths up to this (8 for fp16 / 8-bit on GPU).
            num_workers: DataLoader workers.
            run_dir: where splits.csv, skipped_rows.csv and data_summary.json go; by default the
                trainer's log directory.
            predict_split: which molecules `predict` answers for: a split, or "all" rows of the
                table (for a table of new molecules; `predict` does not need a target column).
        """
        super().__init__()
        self.save_hyperparameters()
        self.table = table
        self.columns = columns or ColumnMap()
        self.on_invalid = on_invalid
        self.duplicate_tolerance_c = duplicate_tolerance_c
        self.stage = stage
        self.split = split
        self.split_fractions = tuple(split_fractions)
        self.holdout_source = holdout_source
        self.split_file = split_file
        self.seed = seed
        self.max_molecules = max_molecules
        self.use_rationale = use_rationale
        self.rationale_style = rationale_style
        if analogues < 0:
            raise ValueError(f"data.analogues must be >= 0, got {analogues}")
        self.analogues = analogues
        self.reference: Optional[ReferenceSet] = None  # built from the training split, or an export's
        self.calibration_set: Optional[list[tuple[str, float]]] = None  # an export's (smiles, measured) to calibrate on
        self._analogues: dict[str, list[Analogue]] = {}
        self.descriptor_estimate = descriptor_estimate
        self.estimator: Optional[DescriptorEstimator] = None  # fitted on the training split, or an export's
        self._estimates: dict[str, float] = {}
        if cpt_replay_ratio < 0:
            raise ValueError(f"data.cpt_replay_ratio must be >= 0, got {cpt_replay_ratio}")
        self.cpt_replay_ratio = cpt_replay_ratio
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.run_dir = run_dir
        self.predict_split = predict_split
        self.tokenizer = None  # set by the stage module in its setup()
        self.records: dict[str, list[Record]] = {}
        self.skipped: list[Skipped] = []
        self._rationales: dict[str, str] = {}

    # ----------------------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        if self.table == "builtin":
            ensure_melting_points()

    def table_path(self) -> Path:
        return ensure_melting_points() if self.table == "builtin" else Path(self.table)

    def output_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        if self.trainer is not None:
            return run_directory(self.trainer)
        return Path.cwd()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.records:
            return
        records, self.skipped = read_table(self.table_path(), self.columns, self.on_invalid,
                                           require_target=stage != "predict",
                                           duplicate_tolerance_c=self.duplicate_tolerance_c)
        if self.max_molecules is not None and len(records) > self.max_molecules:
            records = random.Random(self.seed).sample(sorted(records, key=lambda r: r.smiles), self.max_molecules)
        by_smiles = {r.smiles: r for r in records}
        if self.split_file:
            assignment = read_split(self.split_file)
            missing = sum(1 for s in assignment if s not in by_smiles)
            if missing:
                log.warning("%d molecules of %s are not in the table", missing, self.split_file)
        else:
            assignment = make_split(list(by_smiles), self.split, self.split_fractions, self.seed,
                                    sources={s: r.source for s, r in by_smiles.items()},
                                    holdout_source=self.holdout_source)
        self.records = {name: [] for name in ("train", "val", "test")}
        for smiles in sorted(by_smiles):
            if smiles in assignment:
                self.records[assignment[smiles]].append(by_smiles[smiles])
        self._write_run_files(assignment)

    def _write_run_files(self, assignment: dict[str, str]) -> None:
        if self.trainer is not None and (not self.trainer.is_global_zero or self.trainer.fast_dev_run):
            return  # rank 0 writes them; a fast_dev_run writes nothing (and clobbers no run's splits.csv)
        out = self.output_dir()
        out.mkdir(parents=True, exist_ok=True)
        write_split(assignment, out / "splits.csv")
        if self.skipped:
            write_csv([{"file": s.file, "row": s.row, "problem": s.problem} for s in self.skipped],
                      out / "skipped_rows.csv")
            log.warning("Skipped %d invalid rows of %s; see %s", len(self.skipped), self.table,
                        out / "skipped_rows.csv")
        (out / "data_summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")

    def summary(self) -> dict:
        """Counts and target statistics per split: look at the data before training on it."""
        out = {"table": str(self.table), "skipped_rows": len(self.skipped), "splits": {}}
        for name, records in self.records.items():
            values = sorted(r.target for r in records if r.target is not None)
            stats = {"molecules": len(records)}
            if values:
                stats.update(mean=round(statistics.fmean(values), 2), median=round(statistics.median(values), 2),
                             min=values[0], max=values[-1],
                             std=round(statistics.pstdev(values), 2))
            out["splits"][name] = stats
        return out

    # ----------------------------------------------------------------------------- text
    def rationale(self, record: Record) -> str:
        """The table's own rationale if it has one, else the structure-only writer's: the first call
        writes them for every molecule of the table at once, or reads them from the cache."""
        if record.rationale:
            return record.rationale
        if record.smiles not in self._rationales:
            wanted = sorted({r.smiles for records in self.records.values() for r in records if not r.rationale}
                            - self._rationales.keys() | {record.smiles})
            self._rationales.update(zip(wanted, written_rationales(wanted, self.rationale_style)))
        return self._rationales[record.smiles]

    def use_rationale_style(self, style: RationaleStyle) -> None:
        """Write rationales in ``style`` from now on (a model's export says which style it learned)."""
        if style != self.rationale_style:
            self.rationale_style = style
            self._rationales.clear()

    def reference_set(self) -> ReferenceSet:
        """The molecules analogues are retrieved from: the training split's, unless a stage handed
        in the one its model was trained with (``use_reference``)."""
        if self.reference is None:
            reference = ReferenceSet.from_records(self.records.get("train", []))
            if not len(reference):
                raise ValueError(f"data.analogues={self.analogues}: {self.table} has no measured molecule in its "
                                 f"training split to retrieve analogues from; predict with a model whose export "
                                 f"carries its reference set ({REFERENCE_FILE})")
            self.reference = reference
        return self.reference

    def use_reference(self, reference: ReferenceSet, analogues: int, where: str) -> None:
        """Retrieve ``analogues`` per prompt from ``reference`` (the set a model was trained with, read
        from ``where``: its export or checkpoint) from now on."""
        self.reference, self.analogues, self._analogues = reference, analogues, {}
        log.info("analogues: %d per prompt, retrieved from %s (%d molecules)", analogues, where, len(reference))

    def analogues_of(self, smiles: str) -> list[Analogue]:
        if smiles not in self._analogues:
            self._analogues[smiles] = self.reference_set().neighbours(smiles, self.analogues)
        return self._analogues[smiles]

    def descriptor_estimator(self) -> DescriptorEstimator:
        """The estimator of ``descriptor_estimate``: fitted on the training split, unless a stage handed
        in the one its model was trained with (``use_estimator``)."""
        if self.estimator is None:
            train = [r for r in self.records.get("train", []) if r.target is not None]
            if len(train) < 2:
                raise ValueError(f"data.descriptor_estimate: {self.table} has {len(train)} measured molecules in its "
                                 f"training split, too few to fit the estimator; predict with a model whose export "
                                 f"carries it ({ESTIMATOR_FILE})")
            self.estimator = DescriptorEstimator.from_records(train, seed=self.seed)
        return self.estimator

    def use_estimator(self, estimator: DescriptorEstimator, where: str) -> None:
        """Prompts carry ``estimator``'s estimates (the one a model was trained with, read from ``where``)."""
        self.estimator, self.descriptor_estimate, self._estimates = estimator, True, {}
        log.info("descriptor estimate: from %s (%d training molecules)", where, len(estimator))

    def estimate_of(self, smiles: str) -> float:
        """The descriptor estimate in ``smiles``' prompt; the first call estimates every molecule of the
        table at once (descriptors are computed in bulk)."""
        if smiles not in self._estimates:
            wanted = sorted({smiles} | {r.smiles for records in self.records.values() for r in records}
                            - set(self._estimates))
            self._estimates.update(zip(wanted, self.descriptor_estimator().estimate(wanted)))
        return self._estimates[smiles]

    def prompt(self, smiles: str, written_as: Optional[str] = None, with_estimate: bool = True) -> str:
        """The prompt of molecule ``smiles`` (canonical), its SMILES written as ``written_as`` if given."""
        analogues = self.analogues_of(smiles) if self.analogues else None
        estimate = self.estimate_of(smiles) if self.descriptor_estimate and with_estimate else None
        return render_prompt(written_as or smiles, analogues, estimate)

    def example(self, record: Record, with_estimate: bool = True) -> Example:
        rationale = self.rationale(record) if self.use_rationale else None
        analogues = self.analogues_of(record.smiles) if self.analogues else None
        if analogues and rationale is not None:
            rationale = f"{rationale} {analogue_sentence(analogues, compact=self.rationale_style == 'compact')}"
        return Example(record.smiles, self.prompt(record.smiles, with_estimate=with_estimate),
                       render_completion(rationale, record.target), record.target, record.name)

    def variant_prompts(self, smiles: list[str], variant: int) -> dict:
        """Left-padded prompts for the same molecules written as randomised SMILES number ``variant``
        (0 = canonical; analogues are the molecule's own whatever its spelling): what decoding over
        several SMILES of a molecule answers for. -> {"prompt_ids", "prompt_mask"}."""
        tok = self._require_tokenizer()
        prompts = [[tok.bos_token_id] + self._encode(self.prompt(s, randomized_smiles(s, variant))) for s in smiles]
        return {"prompt_ids": pad_left(prompts, tok.pad_token_id, self.pad_to_multiple_of),
                "prompt_mask": pad_left([[1] * len(p) for p in prompts], 0, self.pad_to_multiple_of)}

    def examples(self, split: str) -> list[Example]:
        return [self.example(r) for r in self.records[split]]

    def calibration_molecules(self) -> list[tuple[str, float]]:
        """(smiles, measured) of the training run's validation molecules, which predict's intervals are
        calibrated on: those the model's export or checkpoint carries, else this table's own validation
        split when predict answers another split of the same table -- never a molecule predict answers
        (with predict_split all or val and nothing carried: none, and the intervals stay raw)."""
        if self.calibration_set is not None:
            return list(self.calibration_set)
        if self.predict_split in ("all", "val"):
            return []
        return [(r.smiles, r.target) for r in self.records.get("val", []) if r.target is not None]

    def use_calibration_set(self, molecules: list[tuple[str, float]], where: str) -> None:
        self.calibration_set = [(str(s), float(t)) for s, t in molecules]
        log.info("interval calibration: %d validation molecules of the training run, from %s",
                 len(self.calibration_set), where)

    def calibration_examples(self, limit: int) -> list[Example]:
        """Prompts of the first ``limit`` calibration molecules (``calibration_molecules``)."""
        return [self.example(Record(smiles, target, None)) for smiles, target in self.calibration_molecules()[:limit]]

    def tokenizer_corpus(self) -> list[str]:
        """Texts a from-scratch tokenizer is trained on: the training split only. Without the estimate
        line where there is nothing to fit the estimator on yet (a table of new molecules before a
        checkpoint hands its estimator in: the checkpoint's tokenizer replaces this one anyway)."""
        measured = sum(1 for r in self.records["train"] if r.target is not None)
        with_estimate = self.estimator is not None or measured >= 2
        texts = []
        for record in self.records["train"]:
            ex = self.example(record, with_estimate)
            texts.append(ex.prompt + ex.completion)
            texts.append(cpt_text(record, self.rationale(record)))
        return texts

    # ----------------------------------------------------------------------------- batches
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("RationaleDataModule.tokenizer is not set: a stage module sets it in setup()")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]

    def collate_sft(self, examples: list[Example]) -> dict:
        tok = self._require_tokenizer()
        full, labels, answers, prompts = [], [], [], []
        for ex in examples:
            prompt = [tok.bos_token_id] + self._encode(ex.prompt)
            # Rationale and answer line are encoded apart (the pre-tokeniser splits at the newline
            # anyway) so that the answer tokens can be marked for an optional loss weight.
            cut = ex.completion.rfind("\n" + ANSWER_MARKER)
            cut = len(ex.completion) if cut < 0 else cut
            rationale = self._encode(ex.completion[:cut])
            answer = self._encode(ex.completion[cut:]) + [tok.eos_token_id]
            full.append((prompt + rationale + answer)[: self.max_length])
            labels.append(([IGNORE_INDEX] * len(prompt) + rationale + answer)[: self.max_length])
            answers.append(([0] * (len(prompt) + len(rationale)) + [1] * len(answer))[: self.max_length])
            prompts.append(prompt)
        input_ids = pad_right(full, tok.pad_token_id, self.pad_to_multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": pad_right([[1] * len(s) for s in full], 0, self.pad_to_multiple_of),
            "labels": pad_right(labels, IGNORE_INDEX, self.pad_to_multiple_of),
            "answer_mask": pad_right(answers, 0, self.pad_to_multiple_of),  # 1 on "\n##Prediction: N</s>"
            **self._prompt_batch(examples, prompts),
        }

    def _prompt_batch(self, examples: list[Example], prompts: list[list[int]]) -> dict:
        tok = self._require_tokenizer()
        return {
            "prompt_ids": pad_left(prompts, tok.pad_token_id, self.pad_to_multiple_of),
            "prompt_mask": pad_left([[1] * len(p) for p in prompts], 0, self.pad_to_multiple_of),
            "targets": torch.tensor([float("nan") if ex.target is None else ex.target for ex in examples]),
            "smiles": [ex.smiles for ex in examples],
        }

    def collate_rl(self, examples: list[Example]) -> dict:
        """Prompts and measured values; with rationales also each molecule's whole written example
        (``rationale_ids``/``rationale_mask``) and ``rationale_labels``, the written rationale's tokens
        and IGNORE_INDEX elsewhere (prompt, answer line): what PPO's ``rationale_anchor`` holds it to."""
        tok = self._require_tokenizer()
        if not self.use_rationale:
            return self._prompt_batch(examples, [[tok.bos_token_id] + self._encode(ex.prompt) for ex in examples])
        written = self.collate_sft(examples)  # its prompt batch too: each prompt encoded once
        rationale_labels = written["labels"].masked_fill(written["answer_mask"].bool(), IGNORE_INDEX)
        return {key: written[key] for key in ("prompt_ids", "prompt_mask", "targets", "smiles")} | {
            "rationale_ids": written["input_ids"], "rationale_mask": written["attention_mask"],
            "rationale_labels": rationale_labels}

    def packed_blocks(self, split: str) -> torch.Tensor:
        """CPT: all texts of a split joined with EOS and cut into (N, max_length) blocks."""
        tok = self._require_tokenizer()
        stream: list[int] = []
        for record in self.records[split]:
            stream += [tok.bos_token_id] + self._encode(cpt_text(record, self.rationale(record))) + [tok.eos_token_id]
        n_blocks = max(len(stream) // self.max_length, 1)
        stream = stream[: n_blocks * self.max_length] + [tok.pad_token_id] * max(0, self.max_length - len(stream))
        return torch.tensor(stream, dtype=torch.long).view(n_blocks, self.max_length)

    def collate_cpt(self, blocks: list[torch.Tensor]) -> dict:
        input_ids = torch.stack(blocks)
        # Padding appears only when a split holds less than one block of text.
        real = input_ids != self._require_tokenizer().pad_token_id
        return {"input_ids": input_ids, "attention_mask": real.long(),
                "labels": input_ids.masked_fill(~real, IGNORE_INDEX)}

    def replay_examples(self, split: str) -> list[Example]:
        """CPT texts dressed as SFT examples with an empty prompt: the loss covers all their tokens."""
        records = self.records[split]
        n = int(round(self.cpt_replay_ratio * len(records)))
        chosen = random.Random(self.seed + 1).choices(records, k=n) if n else []
        return [Example(r.smiles, "", cpt_text(r, self.rationale(r)), None, r.name) for r in chosen]

    def _loader(self, split: str, train: bool) -> DataLoader:
        """Training: a ``ResumableLoader`` in every stage -- each rank trains on its own shard (a
        ``DistributedSampler`` of one shuffle seeded with ``seed``), and a run resumed mid-epoch sees
        exactly the batches an uninterrupted run would. Evaluation: a plain, unshuffled ``DataLoader``
        (Lightning shards it under DDP)."""
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.stage == "cpt":
            data, collate = list(self.packed_blocks(split)), self.collate_cpt
        else:
            data = self.examples(split)
            if train and self.stage == "sft" and self.cpt_replay_ratio:
                data = data + self.replay_examples(split)
            collate = self.collate_sft if self.stage == "sft" else self.collate_rl
        if not train:
            return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate,
                              num_workers=self.num_workers)
        trainer = self.trainer
        sampler = DistributedSampler(data, num_replicas=trainer.world_size if trainer else 1,
                                     rank=trainer.global_rank if trainer else 0, shuffle=True, seed=self.seed)
        return ResumableLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                               num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_split == "all":
            self.records["all"] = [r for name in ("train", "val", "test") for r in self.records[name]]
        return self._loader(self.predict_split, train=False)
