import math

import pytest

from chemlit.data.prompts import (ANSWER_MARKER, NO_NUMBER, answer_prefix, parse_prediction, render, render_completion,
                                  render_prompt)


@pytest.mark.parametrize("text, expected", [
    ("##Prediction: 142", 142.0),
    ("##Prediction: -20", -20.0),
    ("##Prediction: \u221245.5", -45.5),          # Unicode minus
    ("##Prediction: +12", 12.0),
    ("##Prediction: 136.25 °C", 136.25),
    ("##Prediction: 136 °C because of the acid", 136.0),
    ("##Prediction:142\nmore text 999", 142.0),
    ("##Prediction: 300 K", 300 - 273.15),         # Kelvin converted
    ("##Prediction: 212 °F", 100.0),               # Fahrenheit converted
    ("##Prediction: 120-124 °C", 122.0),           # a melting range gives its midpoint
    ("##Prediction: 120 to 130", 125.0),
    ("##Prediction: -20-5", -20.0),                # not a range: the first number
    ("##Prediction: about .5", 0.5),
    ("It has 2 rings and 3 donors.\n##Prediction: 88", 88.0),   # rationale numbers ignored
    ("##Prediction: 10\n##Prediction: 55", 55.0),  # the last answer line counts
    ("##Prediction:\n 77", 77.0),                  # number on the next line
])
def test_parse_prediction_reads_the_answer(text, expected):
    assert parse_prediction(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", [
    "", "no answer at all", "It has 2 rings.", "##Prediction:", "##Prediction: unknown",
    "##Prediction: high", None, 12, "##Prediction: 1e999999",
    "##Prediction: 1111111111111111", "##Prediction: -300", "##Prediction: 2500 °C",  # not melting points
])
def test_parse_prediction_without_a_number_returns_no_number(text):
    assert parse_prediction(text) is NO_NUMBER


def test_render_round_trip_and_split_point():
    prompt = render_prompt("CCO")
    completion = render_completion("Alcohol donates hydrogen bonds.", -114.1)
    assert render("CCO", "Alcohol donates hydrogen bonds.", -114.1) == prompt + completion
    assert prompt.endswith("Rationale:") and "CCO" in prompt
    assert completion.endswith(f"{ANSWER_MARKER} -114")
    assert parse_prediction(prompt + completion) == -114.0


def test_completion_without_rationale_or_value():
    assert render_completion(None, 5.4) == f"\n{ANSWER_MARKER} 5"
    assert render_completion("r", None).endswith(ANSWER_MARKER)
    assert not math.isnan(parse_prediction(render_completion(None, 5.4)))


def test_answer_prefix_cuts_after_the_last_answer_marker_like_the_parser():
    assert answer_prefix([5, 1, 2, 7, 1, 2, 9], [1, 2]) == [5, 1, 2, 7, 1, 2]  # the last occurrence
    assert answer_prefix([5, 1, 2, 9], [1, 2]) == [5, 1, 2]
    assert answer_prefix([1, 5, 2], [1, 2]) is None               # the tokens must be adjacent
    assert answer_prefix([1], [1, 2]) is None                     # shorter than the marker
