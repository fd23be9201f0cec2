import numpy as np

from chemlit.data.records import read_table
from chemlit.eval.baselines import descriptor_matrix, mean_baseline, random_forest_baseline


def test_mean_baseline_predicts_the_training_mean():
    assert mean_baseline([1.0, 2.0, 6.0], 2).tolist() == [3.0, 3.0]


def test_forest_on_descriptors_beats_the_mean_on_a_tiny_table(tiny_table):
    records, _ = read_table(tiny_table)
    train, test = records[:120], records[120:]
    x = descriptor_matrix([r.smiles for r in train[:3]])
    assert x.shape[0] == 3 and x.shape[1] > 100 and np.isfinite(x).all()
    truth = np.array([r.target for r in test])
    forest = random_forest_baseline([r.smiles for r in train], [r.target for r in train],
                                    [r.smiles for r in test], n_estimators=50, n_jobs=1)
    mean = mean_baseline([r.target for r in train], len(test))
    assert np.abs(forest - truth).mean() < np.abs(mean - truth).mean()


def test_descriptors_split_over_processes_equal_one_process(tiny_table):
    records, _ = read_table(tiny_table)
    smiles = [r.smiles for r in records][:110] * 2  # 220 molecules: enough for two workers
    one = descriptor_matrix(smiles, n_jobs=1)
    two = descriptor_matrix(smiles, n_jobs=2)
    assert one.shape == (220, one.shape[1]) and np.array_equal(one, two)
