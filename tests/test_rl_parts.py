"""Rewards, score normalisation, the KL controllers and the curriculum."""

import pytest
import torch

from chemlit.rl.curriculum import Curriculum, CurriculumSpec
from chemlit.rl.kl import KLController, KLSpec
from chemlit.rl.rewards import (
    RewardSpec,
    graded_reward,
    kernel_score,
    leave_one_out_credit,
    normalize_scores,
    score_answers,
)


def test_graded_reward_shape():
    assert graded_reward(0.0, 50.0) == 1.0
    assert graded_reward(50.0, 50.0) == 0.5                           # hyperbolic: 1/2 at the tolerance
    assert graded_reward(150.0, 50.0) == 0.25
    assert graded_reward(25.0, 100.0) == 0.8                          # lenient grader: same error, more reward
    # the seed run's reward, kept as a named option
    assert graded_reward(25.0, 50.0, "linear_floor") == 0.5
    assert graded_reward(50.0, 50.0, "linear_floor") == 0.0
    assert graded_reward(100.0, 50.0, "linear_floor") == -1.0
    assert graded_reward(1000.0, 50.0, "linear_floor") == -1.0        # floored


# One molecule's 8 answers, errors in °C: from exact to far off.
GROUP_ERRORS = [0.0, 5.0, 10.0, 20.0, 40.0, 60.0, 100.0, 150.0]


def normalized_grades(errors, tolerance_c, kernel="hyperbolic"):
    scores = torch.tensor([graded_reward(e, tolerance_c, kernel) for e in errors])
    return normalize_scores(scores, len(errors), "group")


def test_harshness_changes_the_normalised_scores_not_only_their_scale():
    """Group centring and RMS scaling erase an affine change of the reward, so a curriculum that only
    rescaled a linear grade would teach nothing new: within twice the strict tolerance the seed's
    linear grade normalises to the same scores at every level."""
    within = GROUP_ERRORS[:5]  # all below 2 x 25 °C
    lenient, strict = normalized_grades(within, 100.0), normalized_grades(within, 25.0)
    assert (lenient - strict).abs().max() > 0.05
    # the strict level spends more of the signal on the differences between good answers
    assert strict[0] - strict[1] > lenient[0] - lenient[1]
    seed_lenient, seed_strict = normalized_grades(within, 100.0, "linear_floor"), normalized_grades(within, 25.0, "linear_floor")
    torch.testing.assert_close(seed_lenient, seed_strict)  # what the issue found: the seed's curriculum is inert here


@pytest.mark.parametrize("tolerance_c", [200.0, 100.0, 50.0, 25.0, 10.0])
def test_grade_is_strictly_decreasing_up_to_the_largest_errors(tolerance_c):
    errors = torch.arange(0.0, 1000.0, 0.5).tolist()  # the table spans -205..492 °C: errors < 700
    grades = torch.tensor([graded_reward(e, tolerance_c) for e in errors], dtype=torch.float32)
    assert (grades[1:] < grades[:-1]).all()              # no flat region, at float32 precision
    normalised = normalized_grades(GROUP_ERRORS, tolerance_c)
    assert (normalised[1:] < normalised[:-1]).all()      # and after normalisation: the worst answers still differ
    spec = RewardSpec()
    assert spec.no_answer_penalty < grades.min()        # a wrong number above no number


def test_no_answer_penalty_must_lie_below_every_parsed_answer():
    with pytest.raises(ValueError, match="no_answer_penalty"):
        RewardSpec(no_answer_penalty=0.0)
    with pytest.raises(ValueError, match="no_answer_penalty"):
        RewardSpec(objective="kernel_score", no_answer_penalty=-0.5)
    RewardSpec(kernel="linear_floor", no_answer_penalty=-1.0)  # the seed's own setting stays possible


def test_kernel_score_by_hand():
    """K = 2 answers 0 and 10 for a measured 0 °C at tolerance 10: k(0) = 1, k(10) = 1/2.
    S = 1/2 (1 + 1/2 + 1/2 + 1) / 4 - (1 + 1/2) / 2 + 1/2 = 0.125; S({10}) = 0.5; S({0}) = 0."""
    samples, target = torch.tensor([[0.0, 10.0]]), torch.tensor([0.0])
    assert kernel_score(samples, target, 10.0).item() == pytest.approx(0.125)
    credit = leave_one_out_credit(samples, target, 10.0, torch.tensor([[True, True]]))
    assert credit.tolist()[0] == pytest.approx([0.5 - 0.125, 0.0 - 0.125])
    # an unanswered sibling is not part of the distribution: the sole answer's credit is its own grade
    alone = leave_one_out_credit(torch.tensor([[10.0, float("nan")]]), target, 10.0, torch.tensor([[True, False]]))
    assert alone.tolist()[0] == pytest.approx([0.5, 0.0])


def test_kernel_score_is_lenient_crps_and_graded_by_the_tolerance():
    """At a lenient tolerance S ~ CRPS / tolerance (mean |x - y| - 1/2 mean |x - x'|); the curriculum
    grades this objective too: the normalised credits of one group differ between two levels."""
    x = torch.tensor([[3.0, -8.0, 15.0, 40.0]])
    y = torch.tensor([1.0])
    crps = (x - y).abs().mean() - 0.5 * (x[:, :, None] - x[:, None, :]).abs().mean()
    tolerance_c = 1e5
    assert kernel_score(x, y, tolerance_c).item() * tolerance_c == pytest.approx(crps.item(), rel=1e-3)
    samples = torch.tensor([GROUP_ERRORS], dtype=torch.float64)
    answered = torch.ones_like(samples, dtype=torch.bool)
    credits = [normalize_scores(leave_one_out_credit(samples, torch.zeros(1, dtype=torch.float64), t, answered)
                                .reshape(-1), 8, "group") for t in (100.0, 25.0)]
    assert (credits[0] - credits[1]).abs().max() > 0.05
    assert (credits[1][1:5] < credits[1][:4]).all()      # among the good answers: closer, more credit
    # not monotone in the tail, by design of a proper score: a far answer that widens a narrow group
    # earns back some credit (here 150 °C off scores above 60 °C off), yet stays below every good one
    assert credits[1][7] > credits[1][5] and credits[1][7] < credits[1][3]


def test_score_answers_penalises_no_number_and_unfinished():
    spec = RewardSpec(kernel="linear_floor", no_answer_penalty=-1.0, success_reward=0.5)
    texts = [" r\n##Prediction: 110", " r\n##Prediction: 200", " no answer here", " r\n##Prediction: 100"]
    scored = score_answers(texts, [True, True, True, False], [100.0] * 4, tolerance_c=50.0, spec=spec)
    assert scored.rewards.tolist() == pytest.approx([0.8, -1.0, -1.0, -1.0])
    assert scored.predictions == [110.0, 200.0, None, None]  # the cut-off answer is not trusted
    assert scored.successes == [True, False, False, False]
    assert scored.parse_rate == 0.5
    assert scored.mae == pytest.approx(55.0)
    # the default grade: the far answer (error 100) scores above the ones without a number
    default = score_answers(texts, [True, True, True, False], [100.0] * 4, tolerance_c=50.0, spec=RewardSpec())
    assert default.rewards.tolist() == pytest.approx([50 / 60, 50 / 150, -1.0, -1.0])
    assert default.successes == [True, False, False, False]
    # the group objective: two molecules, K = 2; the unanswered sample gets the penalty
    group = score_answers(texts, [True, True, True, False], [100.0, 100.0, 0.0, 0.0], tolerance_c=50.0,
                          spec=RewardSpec(objective="kernel_score"), group_size=2)
    assert group.rewards[0] > 0 > group.rewards[1] > -1.0
    assert group.rewards[2:].tolist() == [-1.0, -1.0]


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
