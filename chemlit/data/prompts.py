"""The one prompt template, and the parser that reads a number back out of a generation.

Every stage meets the text through these functions only:

    Molecule: CC(=O)Oc1ccccc1C(=O)O
    Question: What is the melting point in °C?
    Rationale: <rationale text>
    ##Prediction: 136

``render_prompt`` gives everything up to and including ``Rationale:``; ``render_completion`` gives
the rest (rationale, answer line, nothing else). The model learns to write the completion; the
parser only ever trusts the number after ``##Prediction:``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Optional

ANSWER_MARKER = "##Prediction:"
QUESTION = "What is the melting point in °C?"

#: What ``parse_prediction`` returns when the text holds no usable number.
NO_NUMBER = None
#: Melting points outside this range (°C) are not answers but runaway digits ("1111111..."):
#: nothing melts below absolute zero, and no organic compound melts anywhere near 2000 °C.
PLAUSIBLE_RANGE_C = (-273.15, 2000.0)


def render_prompt(smiles: str, analogues: Optional[Sequence] = None, estimate: Optional[float] = None) -> str:
    """The part the model is given: molecule and question, ending where the rationale starts.

    With ``analogues`` (``chemlit.data.analogues.Analogue``: the most similar training molecules),
    a line after the molecule gives their similarity and measured value, most similar first:
    ``Analogues (similarity, °C): 0.82 121; 0.75 95; 0.61 80``. With ``estimate`` (°C, from
    ``chemlit.data.estimates``), a line ``Descriptor estimate: 128 °C``.
    """
    lines = [f"Molecule: {smiles}"]
    if analogues:
        lines.append("Analogues (similarity, °C): " + "; ".join(
            f"{a.similarity:.2f} {format_value(a.value)}" for a in analogues))
    if estimate is not None:
        lines.append(f"Descriptor estimate: {format_value(estimate)} °C")
    return "\n".join(lines + [f"Question: {QUESTION}", "Rationale:"])


def analogue_sentence(analogues: Sequence, compact: bool = False) -> str:
    """What the rationale says about the analogues: the closest one and the similarity-weighted mean."""
    weights = [max(a.similarity, 0.0) for a in analogues]
    total = sum(weights)
    mean = (sum(w * a.value for w, a in zip(weights, analogues)) / total if total > 0
            else sum(a.value for a in analogues) / len(analogues))
    closest = analogues[0]
    if compact:
        return f"analogues mean {format_value(mean)}, closest {closest.similarity:.2f} at {format_value(closest.value)}."
    return (f"Analogues: the closest (similarity {closest.similarity:.2f}) melts at {format_value(closest.value)} °C; "
            f"weighted by similarity they average {format_value(mean)} °C.")


def answer_prefix(token_ids: list[int], marker_ids: list[int]) -> Optional[list[int]]:
    """``token_ids`` up to and including the last occurrence of ``marker_ids`` (the tokenised answer
    marker): what a model wrote before its answer line, cut where ``parse_prediction`` reads (the
    last marker). None when the marker is not there."""
    n = len(marker_ids)
    for start in range(len(token_ids) - n, -1, -1):
        if token_ids[start:start + n] == marker_ids:
            return token_ids[:start + n]
    return None


def answer_line_prefix(token_ids: list[int], marker_ids: list[int], newline_marker_ids: list[int]) -> list[int]:
    """What a model wrote up to its answer marker, where the number goes next: cut after the last
    marker, or, when the marker is missing or malformed ("##Prediction 30", a rationale cut by the
    token limit), everything written with "\n##Prediction:" appended. PPO samples its answer lines
    after this prefix, and median decoding its numbers, so every molecule gets an answer."""
    return answer_prefix(token_ids, marker_ids) or token_ids + newline_marker_ids


def format_value(value: float) -> str:
    """Targets are written as whole degrees: the measurement error of melting points is larger."""
    rounded = int(round(value))
    return str(rounded)


def render_completion(rationale: Optional[str], value: Optional[float]) -> str:
    """The part the model writes. ``value=None`` gives the completion without the answer line."""
    text = f" {rationale.strip()}" if rationale else ""
    text += f"\n{ANSWER_MARKER}"
    if value is not None:
        text += f" {format_value(value)}"
    return text


def render(smiles: str, rationale: Optional[str], value: Optional[float]) -> str:
    """Prompt and completion as one text (what SFT trains on)."""
    return render_prompt(smiles) + render_completion(rationale, value)


# A number: optional sign (ASCII or Unicode minus), digits with optional decimals and exponent. A
# decimal comma is not accepted: '1,234' is ambiguous.
_NUMBER = r"[-+\u2212]?\s*(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
# A range such as "120-125", "120 – 125" or "120 to 125": chemists often report melting ranges.
_RANGE = re.compile(
    rf"(?P<low>{_NUMBER})\s*(?:-|\u2013|\u2014|to)\s*(?P<high>\d+(?:\.\d+)?)"
)
_SINGLE = re.compile(rf"(?P<value>{_NUMBER})")
_UNIT = re.compile(r"\s*(?P<unit>°\s*[CFK]|º\s*[CFK]|deg(?:rees)?\s*[CFK]?|K\b|C\b|F\b|kelvin|celsius|fahrenheit)", re.I)


def _to_float(text: str) -> float:
    return float(text.replace("\u2212", "-").replace(" ", ""))


def to_celsius(value: float, unit: Optional[str]) -> float:
    """``value`` in ``unit`` as °C. The unit as a table states it (C, K, F) or as a model writes it
    (°C, ºF, K, kelvin, degrees F, ...); none or an unknown one means °C."""
    if not unit:
        return value
    unit = unit.lower().replace(" ", "").replace("º", "°")
    if unit in ("k", "°k", "kelvin", "degk", "degreesk"):
        return value - 273.15
    if unit in ("°f", "f", "fahrenheit", "degf", "degreesf"):
        return (value - 32.0) * 5.0 / 9.0
    return value


def parse_prediction(text: str) -> Optional[float]:
    """Read the predicted melting point (°C) from a generation; never raises.

    Only the text after the last ``##Prediction:`` counts (numbers in the rationale, such as "2
    rings", are never taken for the answer). After the marker, the first number is the answer; a
    range "120-125" gives its midpoint; a unit of K or °F is converted to °C. Returns
    ``NO_NUMBER`` (None) when there is no marker, no number after it, or the number is not finite
    or outside ``PLAUSIBLE_RANGE_C``.
    """
    if not isinstance(text, str):
        return NO_NUMBER
    head, marker, tail = text.rpartition(ANSWER_MARKER)
    if not marker:
        return NO_NUMBER
    tail = tail.lstrip(" \t\n").split("\n", 1)[0]  # the answer is the first line after the marker
    match = _RANGE.search(tail)
    single = _SINGLE.search(tail)
    if single is None:
        return NO_NUMBER
    try:
        if match is not None and match.start() == single.start():
            low, high = _to_float(match["low"]), _to_float(match["high"])
            if low < 0 < high or high < abs(low):
                # "-20-5" is not a range from -20 to 5 that a chemist writes; take the first number.
                value, end = low, single.end()
            else:
                value, end = (low + high) / 2.0, match.end()
        else:
            value, end = _to_float(single["value"]), single.end()
    except ValueError:
        return NO_NUMBER
    unit = _UNIT.match(tail, end)
    value = to_celsius(value, unit["unit"] if unit else None)
    low, high = PLAUSIBLE_RANGE_C
    return value if math.isfinite(value) and low <= value <= high else NO_NUMBER
