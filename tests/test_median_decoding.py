"""decoding=median: the number is the median of numbers sampled after the model's own answer marker."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.records import canonical_smiles, randomized_smiles
from chemlit.data.prompts import ANSWER_MARKER
from chemlit.data.tokenizer import train_smiles_tokenizer
from chemlit.models.factory import TinyConfig, build_tiny
from chemlit.stages.handover import CALIBRATION_FILE, adopt_export, export_files
from chemlit.stages.sft import SFTModule, conformal_scale


def test_median_of_sampled_numbers_after_the_marker(monkeypatch):
    tokenizer = train_smiles_tokenizer(["Molecule: CCO\nRationale: small.\n##Prediction: 123"] * 10, vocab_size=300)
    module = SFTModule(decoding="median", answer_samples=3)
    module.tokenizer = tokenizer
    module.model = build_tiny(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                              len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    prompt = tokenizer.encode("Molecule: CCO\nRationale:")
    prompt_ids = torch.tensor([prompt, prompt])
    prompt_mask = torch.ones_like(prompt_ids)
    answer = tokenizer.encode(" small.\n##Prediction: 100") + [tokenizer.eos_token_id]
    no_marker = tokenizer.encode(" small, no answer") + [tokenizer.eos_token_id]
    width = max(len(answer), len(no_marker))
    out = torch.tensor([prompt + answer + [tokenizer.pad_token_id] * (width - len(answer)),
                        prompt + no_marker + [tokenizer.pad_token_id] * (width - len(no_marker))])
    seen = {}

    def fake_decode(model, prefix_ids, prefix_mask, repeats, max_new_tokens, eos_token_id, pad_token_id,
                    temperature):
        seen.update(prefix_ids=prefix_ids, repeats=repeats, temperature=temperature)
        continuations = [" 90", " 300", " 120", " 50", " 60", "no number"]  # 3 samples for each of the 2 rows
        tails = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in continuations]
        w = max(map(len, tails))
        return torch.tensor([t + [tokenizer.pad_token_id] * (w - len(t)) for t in tails])

    monkeypatch.setattr("chemlit.stages.answering.decode_after_prefix", fake_decode)
    numbers = module.sampled_numbers(prompt_ids, prompt_mask, out)
    assert numbers == [[90.0, 300.0, 120.0], [50.0, 60.0]]
    values, intervals = module.median_and_interval(numbers + [[]], fallback=[100.0, None, 7.0])
    assert values == [120.0, 55.0, 7.0]  # a molecule without any number keeps its greedy value
    # the 10th-90th percentile of the samples 90, 300, 120 (linear interpolation); none without samples
    assert intervals[0] == pytest.approx((90 + 0.2 * 30, 120 + 0.8 * 180))
    assert all(math.isnan(x) for x in intervals[2])
    # the samples continue the model's own rationale, right after its answer marker; a rationale without
    # one (here, or a malformed "##Prediction 30") gets the marker appended, as in PPO's rollout
    first, second = (tokenizer.decode(row[row != tokenizer.pad_token_id]) for row in seen["prefix_ids"])
    assert first.endswith(ANSWER_MARKER) and "small." in first
    assert second.endswith("small, no answer\n" + ANSWER_MARKER)
    assert seen["prefix_ids"].size(0) == 2 and seen["repeats"] == 3
    assert seen["temperature"] == module.temperature  # plain sampling at the configured temperature


def test_randomised_smiles_are_the_same_molecule_spelled_otherwise():
    smiles = "CC(=O)Oc1ccccc1C(=O)O"
    variants = [randomized_smiles(smiles, seed) for seed in range(6)]
    assert variants[0] == canonical_smiles(smiles)
    assert all(canonical_smiles(v) == variants[0] for v in variants)
    assert len(set(variants)) >= 4                                      # really other spellings
    assert variants == [randomized_smiles(smiles, seed) for seed in range(6)]  # and always the same ones
    assert randomized_smiles("OC(=O)c1ccccc1OC(C)=O", 3) == variants[3]  # whatever spelling came in


def _median_module(tmp_path, tiny_table, **options):
    """A tiny SFT model answering by decoding=median (3 samples) over the tiny table's datamodule."""
    dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path))
    dm.setup()
    tokenizer = train_smiles_tokenizer(dm.tokenizer_corpus(), vocab_size=400)
    dm.tokenizer = tokenizer
    module = SFTModule(decoding="median", answer_samples=3, **options)
    module.tokenizer = tokenizer
    module.model = build_tiny(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                              len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    module._trainer = SimpleNamespace(datamodule=dm, sanity_checking=False, validating=False,
                                      state=SimpleNamespace(fn="predict"),  # calibration asks: stop? (no signal)
                                      strategy=SimpleNamespace(reduce_boolean_decision=lambda flag, all: flag))
    return dm, tokenizer, module


def test_smiles_variants_pool_the_numbers_of_every_spelling(tmp_path, tiny_table, monkeypatch):
    """smiles_variants=3: greedy rationale + K samples for each of 3 spellings, one median over all 3K numbers."""
    dm, tokenizer, module = _median_module(tmp_path, tiny_table, smiles_variants=3)
    batch = dm.collate_rl(dm.examples("test")[:2])
    prompts_seen = []

    def fake_generate(prompt_ids, prompt_mask):
        prompts_seen.append([tokenizer.decode(row[mask.bool()]) for row, mask in zip(prompt_ids, prompt_mask)])
        answer = tokenizer.encode(" small.\n##Prediction: 100") + [tokenizer.eos_token_id]
        return torch.tensor([answer] * prompt_ids.size(0)), ["small.\n##Prediction: 100"] * prompt_ids.size(0)

    calls = iter([[" 90", " 300", " 120"] * 2, [" 10", " 20", " 30"] * 2, [" 400", " 410", " 420"] * 2])

    def fake_decode(model, prefix_ids, prefix_mask, repeats, max_new_tokens, eos_token_id, pad_token_id,
                    temperature):
        tails = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in next(calls)]
        w = max(map(len, tails))
        return torch.tensor([t + [tokenizer.pad_token_id] * (w - len(t)) for t in tails])

    monkeypatch.setattr(module, "generate", lambda ids, mask: fake_generate(ids, mask))
    monkeypatch.setattr("chemlit.stages.answering.decode_after_prefix", fake_decode)
    texts, values, intervals = module.answer_with_interval(batch)
    pooled = [90, 300, 120, 10, 20, 30, 400, 410, 420]
    assert values.tolist() == [float(np.median(pooled))] * 2
    assert intervals[0] == pytest.approx(tuple(np.quantile(pooled, [0.1, 0.9])))
    assert len(prompts_seen) == 3  # the canonical prompt and two other spellings
    for b, smiles in enumerate(batch["smiles"]):
        spelled = [seen[b].split("Molecule: ")[1].split("\n")[0] for seen in prompts_seen]
        assert spelled[0] == smiles and {canonical_smiles(s) for s in spelled} == {smiles}


def test_conformal_scale_gives_the_nominal_coverage_on_new_molecules():
    """Intervals three times too narrow (as a fine-tuned model's samples are): raw coverage far below 80 %,
    calibrated on 1,000 molecules, about 80 % on 20,000 others."""
    rng = np.random.default_rng(0)
    spread = rng.uniform(5, 40, 21000)                  # each molecule's own uncertainty
    truth = rng.normal(0, spread)                       # measured value around a median of 0
    half = 1.2816 * spread / 3                          # the 10th-90th percentile of a 3x too narrow belief
    median, low, high = np.zeros_like(truth), -half, half
    raw = np.mean(np.abs(truth[1000:]) <= half[1000:])
    assert raw < 0.4
    s = conformal_scale(median[:1000], low[:1000], high[:1000], truth[:1000], 0.8)
    covered = np.mean(np.abs(truth[1000:]) <= s * half[1000:])
    assert 0.77 <= covered <= 0.84 and 2.5 < s < 3.5
    # too wide intervals are narrowed
    assert conformal_scale(median[:1000], 3 * low[:1000], 3 * high[:1000], truth[:1000], 0.8) < 1.2


def test_predict_intervals_are_calibrated_on_validation_molecules(tmp_path, tiny_table, monkeypatch):
    dm, tokenizer, module = _median_module(tmp_path, tiny_table, calibration_molecules=6)
    answer = tokenizer.encode(" small.\n##Prediction: 100") + [tokenizer.eos_token_id]
    monkeypatch.setattr(module, "generate", lambda ids, mask: (torch.tensor([answer] * ids.size(0)),
                                                               ["small.\n##Prediction: 100"] * ids.size(0)))

    def fake_decode(model, prefix_ids, prefix_mask, repeats, max_new_tokens, eos_token_id, pad_token_id,
                    temperature):  # every molecule: samples 90, 100, 110 -> median 100, 10th-90th 92..108
        tails = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in [" 90", " 100", " 110"] * prefix_ids.size(0)]
        w = max(map(len, tails))
        return torch.tensor([t + [tokenizer.pad_token_id] * (w - len(t)) for t in tails])

    monkeypatch.setattr("chemlit.stages.answering.decode_after_prefix", fake_decode)
    module.calibrate_interval()
    measured = [ex.target for ex in dm.examples("val")][:6]
    expected = conformal_scale([100.0] * 6, [92.0] * 6, [108.0] * 6, measured, 0.8)
    assert module.interval_scale == pytest.approx(expected) and expected > 1
    assert np.mean([abs(t - 100) <= 8 * expected for t in measured]) >= 0.8
    _, values, intervals = module.answer_with_interval(dm.collate_rl(dm.examples("test")[:2]))
    assert values.tolist() == [100.0, 100.0]
    assert intervals[0] == pytest.approx((100 - 8 * expected, 100 + 8 * expected))
    module.calibration_molecules = 0  # off: the raw quantiles
    module.interval_scale = 1.0
    assert module.answer_with_interval(dm.collate_rl(dm.examples("test")[:1]))[2][0] == pytest.approx((92, 108))


def test_predict_never_calibrates_on_the_molecules_it_answers(tmp_path, tiny_table, monkeypatch):
    """predict_split all on a table: its own validation split is among the answered molecules, so the
    intervals are calibrated on the training run's validation molecules that the export carries, or not at all."""
    dm, tokenizer, module = _median_module(tmp_path, tiny_table, calibration_molecules=6)
    dm.predict_split = "all"
    answered = []
    answer = tokenizer.encode(" small.\n##Prediction: 100") + [tokenizer.eos_token_id]

    def fake_generate(ids, mask):
        answered.extend(tokenizer.decode(row[m.bool()]).split("Molecule: ")[1].split("\n")[0] for row, m in zip(ids, mask))
        return torch.tensor([answer] * ids.size(0)), ["small.\n##Prediction: 100"] * ids.size(0)

    monkeypatch.setattr(module, "generate", fake_generate)
    monkeypatch.setattr("chemlit.stages.answering.decode_after_prefix", lambda model, prefix_ids, *a, **k: torch.tensor(
        [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in [" 90", " 100", " 110"] * prefix_ids.size(0)]))
    module.calibrate_interval()
    assert answered == [] and module.interval_scale == 1.0   # nothing carried: raw quantiles, no table molecule read
    # the export of the training run carries its validation molecules; predict calibrates on those
    training_run = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path / "train"))
    training_run.setup()
    files = export_files(training_run)
    carried = json.loads(files[CALIBRATION_FILE])
    assert [s for s, _ in carried] == [r.smiles for r in training_run.records["val"]]
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / CALIBRATION_FILE).write_text(files[CALIBRATION_FILE])
    adopt_export(dm, str(tmp_path / "export"))
    module.calibrate_interval()
    assert answered == [s for s, _ in carried[:6]] and module.interval_scale != 1.0
