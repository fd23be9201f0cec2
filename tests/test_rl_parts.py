"""Rewards, score normalisation, the KL controllers and the curriculum."""

import pytest
import torch

from chemlit.rl.curriculum import Curriculum, CurriculumSpec
from chemlit.rl.kl import KLController, KLSpec
from chemlit.rl.rewards import RewardSpec, graded_reward, normalize_scores, score_answers


def test_graded_reward_shape():
    assert graded_reward(0.0, 50.0) == 1.0
    assert graded_reward(25.0, 50.0) == 0.5
    assert graded_reward(50.0, 50.0) == 0.0
    assert graded_reward(100.0, 50.0) == -1.0
    assert graded_reward(1000.0, 50.0) == -1.0   # floored
    assert graded_reward(25.0, 100.0) == 0.75    # lenient grader: same error, more reward


def test_score_answers_penalises_no_number_and_unfinished():
    spec = RewardSpec(no_answer_penalty=-1.0, success_reward=0.5)
    texts = [" r\n##Prediction: 110", " r\n##Prediction: 200", " no answer here", " r\n##Prediction: 100"]
    scored = score_answers(texts, [True, True, True, False], [100.0] * 4, tolerance_c=50.0, spec=spec)
    assert scored.rewards.tolist() == pytest.approx([0.8, -1.0, -1.0, -1.0])
    assert scored.predictions == [110.0, 200.0, None, None]  # the cut-off answer is not trusted
    assert scored.successes == [True, False, False, False]
    assert scored.parse_rate == 0.5
    assert scored.mae == pytest.approx(55.0)


def test_normalize_scores_against_the_greedy_answer():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])  # two molecules, K = 2
    baseline = torch.tensor([0.5, 0.75])         # rewards of their greedy answers
    out = normalize_scores(scores, 2, "greedy", baseline=baseline)
    d = torch.tensor([0.5, -0.5, -0.25, -0.25])  # sample - its molecule's greedy reward
    torch.testing.assert_close(out, d / d.pow(2).mean().sqrt())  # scaled, sign kept (not centred)
    with pytest.raises(ValueError, match="baseline"):
        normalize_scores(scores, 2, "greedy")


def test_normalize_scores_group_and_batch():
    scores = torch.tensor([1.0, 0.0, 5.0, 5.0])  # two prompts, K = 2
    group = normalize_scores(scores, 2, "group")
    # deviations from the group means: [0.5, -0.5, 0, 0], std over the batch = sqrt(0.125)
    torch.testing.assert_close(group, torch.tensor([0.5, -0.5, 0.0, 0.0]) / 0.125 ** 0.5)
    batch = normalize_scores(scores, 2, "batch")
    assert batch.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert batch.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(normalize_scores(scores, 2, "none"), scores)
    same = normalize_scores(torch.ones(4), 2, "group")  # every answer equal: no signal, no NaN
    assert torch.isfinite(same).all() and same.abs().max() == 0
    with pytest.raises(ValueError, match="groups of 3"):
        normalize_scores(scores, 3, "group")


def test_kl_controllers():
    fixed = KLController(KLSpec(coef=0.1, controller="fixed"))
    assert fixed.update(100.0, 128) == 0.1
    adaptive = KLController(KLSpec(coef=0.1, controller="adaptive", target=1.0, horizon=1000))
    # KL 3x the target: error clipped to +0.2; β *= 1 + 0.2 * 128 / 1000
    assert adaptive.update(3.0, 128) == pytest.approx(0.1 * (1 + 0.2 * 0.128))
    # KL half the target: error -0.2 (clipped from -0.5)
    before = adaptive.value
    assert adaptive.update(0.5, 128) == pytest.approx(before * (1 - 0.2 * 0.128))
    restored = KLController(KLSpec(coef=0.1, controller="adaptive"))
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_curriculum_advances_and_falls_back():
    curriculum = Curriculum(CurriculumSpec(tolerances_c=[100.0, 50.0, 25.0], advance_at=0.6, fall_back_at=0.2,
                                           window=4))
    assert curriculum.tolerance_c == 100.0
    assert curriculum.update([True, True, True], iteration=1) == 0   # window not full yet
    assert curriculum.update([False], iteration=2) == 1              # 3/4 = 0.75 >= 0.6
    assert curriculum.tolerance_c == 50.0 and len(curriculum.window) == 0
    assert curriculum.update([True, False, True, False], iteration=3) == 0  # 0.5: stay
    assert curriculum.update([False, False, False, False], iteration=4) == -1  # 0 < 0.2: back
    assert curriculum.tolerance_c == 100.0
    assert curriculum.history == [(0, 0), (2, 1), (4, 0)]
    restored = Curriculum(curriculum.spec)
    restored.load_state_dict(curriculum.state_dict())
    assert (restored.level, list(restored.window), restored.history) == \
        (curriculum.level, list(curriculum.window), curriculum.history)


def test_curriculum_stays_at_last_level_and_validates():
    strict = Curriculum(CurriculumSpec(tolerances_c=[100.0, 25.0], start_level=1, window=2))
    assert strict.update([True, True], 1) == 0 and strict.tolerance_c == 25.0
    with pytest.raises(ValueError, match="start_level"):
        CurriculumSpec(tolerances_c=[50.0], start_level=1)
    with pytest.raises(ValueError, match="positive"):
        CurriculumSpec(tolerances_c=[50.0, 0.0])
