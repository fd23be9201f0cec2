"""Reward harshness as a curriculum: a lenient grader first, a stricter one as the model succeeds.

Levels are tolerances in °C: the tolerance of the grade (``chemlit.rl.rewards.graded_reward``, 1/2 at
an error of one tolerance for the default hyperbolic kernel) and of the group objective's kernel, so
a level changes the *shape* of what PPO optimises, not only its scale. The curriculum keeps a
rolling window of successes (grade >= RewardSpec.success_reward) at the current level. When the
window is full and its success rate reaches ``advance_at``, it moves to the next, stricter level and
starts a fresh window; if the rate falls below ``fall_back_at`` it steps back one level. The whole
state (level, window, history of moves) is saved in checkpoints.

The run we build on graded at 50 °C from step one with a model whose typical error was ~50 °C:
too few successes to learn from. Starting lenient gives the policy something to climb.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class CurriculumSpec:
    """The harshness schedule."""

    tolerances_c: list[float] = field(default_factory=lambda: [100.0, 50.0, 25.0])
    """Levels from lenient to strict: the grade's tolerance in °C. One level = no curriculum."""
    advance_at: float = 0.6
    """Success rate over the window that moves to the next, stricter level."""
    fall_back_at: float = 0.15
    """Success rate below which the curriculum steps back one level (0 = never)."""
    window: int = 512
    """Samples in the rolling success window (a few PPO iterations' worth)."""
    start_level: int = 0
    """Index of the first level (set it to the last to grade strictly from step one)."""

    def __post_init__(self):
        if not self.tolerances_c or any(t <= 0 for t in self.tolerances_c):
            raise ValueError(f"curriculum.tolerances_c must be positive numbers, got {self.tolerances_c}")
        if not 0 <= self.start_level < len(self.tolerances_c):
            raise ValueError(f"curriculum.start_level {self.start_level} is not a level of {self.tolerances_c}")
        if not 0 <= self.fall_back_at < self.advance_at <= 1:
            raise ValueError("curriculum needs 0 <= fall_back_at < advance_at <= 1")


class Curriculum:
    def __init__(self, spec: CurriculumSpec):
        self.spec = spec
        self.level = spec.start_level
        self.window: deque[bool] = deque(maxlen=spec.window)
        self.history: list[tuple[int, int]] = [(0, self.level)]  # (iteration, level) at each move

    @property
    def tolerance_c(self) -> float:
        return self.spec.tolerances_c[self.level]

    @property
    def success_rate(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0

    def update(self, successes: list[bool], iteration: int) -> int:
        """Record one iteration's successes; returns the move made: +1 stricter, -1 back, 0 stay."""
        self.window.extend(successes)
        if len(self.window) < self.window.maxlen:
            return 0
        move = 0
        if self.success_rate >= self.spec.advance_at and self.level < len(self.spec.tolerances_c) - 1:
            move = 1
        elif self.success_rate < self.spec.fall_back_at and self.level > 0:
            move = -1
        if move:
            self.level += move
            self.window.clear()
            self.history.append((iteration, self.level))
        return move

    def state_dict(self) -> dict:
        return {"level": self.level, "window": list(self.window), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.level = int(state["level"])
        self.window = deque((bool(s) for s in state["window"]), maxlen=self.spec.window)
        self.history = [tuple(h) for h in state["history"]]
