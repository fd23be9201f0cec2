"""Data parallel is data parallel: on two CPU processes each rank trains on its own molecules, and what
must be a statistic of the whole batch is one. The runs are in tests/ddp_runs.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two-process runs

RUNS = Path(__file__).parent / "ddp_runs.py"


def launch(tmp_path: Path, what: str) -> None:
    result = subprocess.run([sys.executable, str(RUNS), str(tmp_path), what], capture_output=True, text=True,
                            timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]


def ranks(tmp_path: Path, name: str) -> list[dict]:
    out = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in out] == [2, 2]
    return out


def assert_sharded(seen: list[list[list[str]]]) -> None:
    """seen[rank][step] = the items of that rank's batch: in every step the ranks' items are disjoint, and
    over the run no item comes twice (together the ranks walk through one shuffled epoch)."""
    assert len(seen[0]) == len(seen[1]) > 0
    for a, b in zip(*seen):
        assert len(a) == len(b) > 0 and not set(a) & set(b), (a, b)
    everything = [item for rank in seen for batch in rank for item in batch]
    assert len(everything) == len(set(everything))


def test_ppo_ranks_roll_out_disjoint_molecules_stay_equal_and_resume_exactly(tmp_path):
    launch(tmp_path, "ppo")
    straight = ranks(tmp_path, "straight")
    assert_sharded([r["seen"] for r in straight])
    assert len(straight[0]["seen"]) == 4
    # gradients are averaged: after every update both ranks hold the same weights
    assert len(straight[0]["checksums"]) == 4
    assert straight[0]["checksums"] == pytest.approx(straight[1]["checksums"], rel=1e-9)
    assert straight[0]["curriculum"] == straight[1]["curriculum"] and straight[0]["beta"] == straight[1]["beta"]
    # advantages are scaled over both ranks' samples together: mean square 1 over the whole batch (the
    # scores were centred once, per molecule; the advantages are not centred again)
    for a, b in zip(straight[0]["advantage_sums"], straight[1]["advantage_sums"]):
        _, squares, count = (x + y for x, y in zip(a, b))
        assert squares / count == pytest.approx(1.0, abs=1e-3)
        assert a[1] / a[2] != pytest.approx(1.0, abs=1e-3)  # one rank alone is not: the scale is the batch's
    # a run stopped after 2 iterations and resumed sees the prompts the uninterrupted run saw, and ends equal
    first, resumed = ranks(tmp_path, "first-half"), ranks(tmp_path, "resumed")
    for rank in (0, 1):
        assert first[rank]["seen"] + resumed[rank]["seen"] == straight[rank]["seen"]
        assert resumed[rank]["checksums"][-1] == straight[rank]["checksums"][-1]
        assert resumed[rank]["curriculum"] == straight[rank]["curriculum"]
        assert resumed[rank]["responses"] == straight[rank]["responses"][2:]  # the same samples, drawn again
    # each rank samples from its own stream: given the same molecules, the two ranks draw different answers
    same = ranks(tmp_path, "same-prompts")
    assert same[0]["seen"] == same[1]["seen"]
    assert same[0]["responses"] != same[1]["responses"]


def test_sft_and_cpt_ranks_train_on_disjoint_shards(tmp_path):
    launch(tmp_path, "sft_cpt")
    for name in ("sft", "cpt"):
        runs = ranks(tmp_path, name)
        assert_sharded([r["seen"] for r in runs])
        assert runs[0]["checksum"] == pytest.approx(runs[1]["checksum"], rel=1e-9)
