"""How deep the PPO stack is: the frames between ``PPOModule.training_step`` and an attention layer's
forward, in each phase of one iteration (``python -m chemlit.bench depth``).

A forward hook on the first attention layer reads the Python stack each time the layer runs and
notes, per phase (the ``PPOModule`` method on the stack: rollout, evaluate, reference_logprobs,
update), the largest number of frames between ``training_step`` and the layer's forward. That is
how far a person stepping down from ``training_step`` in a debugger goes to reach attention.
"""

from __future__ import annotations

import inspect
import sys

import lightning as L

PHASES = ("reference_logprobs", "update", "evaluate", "rollout")  # innermost first: evaluate calls reference_logprobs


def attention_layer(model):
    """The first module whose class name ends in 'Attention' (every transformers decoder has one per layer)."""
    return next(m for m in model.modules() if type(m).__name__.endswith("Attention"))


def depth_hook(depths: dict):
    def hook(module, args, output):
        names = [frame.function for frame in inspect.stack(0)]  # innermost first; [0] is this hook
        if "training_step" not in names:
            return
        top = names.index("training_step")
        # The hook runs where the layer's forward ran (one call below the layer's __call__): frames
        # from training_step down to that forward.
        phase = next((name for name in names[:top] if name in PHASES), "other")
        depths[phase] = max(depths.get(phase, 0), top)
    return hook


DEPTHS: dict[str, int] = {}


class DepthProbe(L.Callback):
    """Hooks the first attention layer of the policy and of the frozen reference (a separate network
    without LoRA) when training starts; the depths land in ``DEPTHS``."""

    def on_train_start(self, trainer, pl_module):
        for network in (pl_module.model, getattr(pl_module, "reference", None)):
            if network is not None:
                attention_layer(network).register_forward_hook(depth_hook(DEPTHS))


def measure(cli_args: list[str]) -> dict[str, int]:
    """Run ``python -m chemlit fit <cli_args>`` (one iteration) with the probe; -> {phase: frames}."""
    from chemlit.cli import main

    DEPTHS.clear()
    main(["fit", *cli_args, f"--trainer.callbacks+={__name__}.DepthProbe"])
    return dict(DEPTHS)


if __name__ == "__main__":
    print(measure(sys.argv[1:]))
