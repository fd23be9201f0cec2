import math

import torch

from chemlit.stages.base import next_token_loss


def test_next_token_loss_matches_hand_values_with_mask_and_weights():
    # Vocabulary of 2; logits favour token 0 with log-odds 1 at every position.
    logits = torch.tensor([[[1.0, 0.0]] * 4])                  # (1, 4, 2)
    labels = torch.tensor([[-100, 0, 1, -100]])                # position 0 and padding ignored
    ce0 = -math.log(math.e / (math.e + 1))                      # predicting 0
    ce1 = -math.log(1 / (math.e + 1))                           # predicting 1
    assert math.isclose(next_token_loss(logits, labels).item(), (ce0 + ce1) / 2, rel_tol=1e-6)
    weights = torch.tensor([[1.0, 1.0, 3.0, 1.0]])             # the second target weighs 3
    assert math.isclose(next_token_loss(logits, labels, weights).item(), (ce0 + 3 * ce1) / 4, rel_tol=1e-6)


def test_no_labelled_token_gives_zero_not_nan():
    logits = torch.zeros(2, 3, 5)
    labels = torch.full((2, 3), -100)
    assert next_token_loss(logits, labels).item() == 0.0
