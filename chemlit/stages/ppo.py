"""RL: a hand-written PPO that rewards the right melting point.

One training step is one PPO iteration, and reads as the algorithm does:

    rollout  = self.rollout(batch)            sample K answers per molecule (this rank's own random stream)
    scored   = self.score(rollout)            parse, error, reward at the curriculum's harshness
    plan     = self.minibatch_plan(G)         which molecules go into which minibatch, per PPO epoch
    self.evaluate(rollout, plan[0])           old log-probs and values (the update's own forward), reference log-probs
    self.token_rewards(rollout, scores)       score on the last token, -β·k1 on every token
    self.advantages(rollout, token_rewards)   GAE -> advantages scaled to unit RMS over the batch
    for minibatch in plan: self.update(...)   forward -> ppo_math.ppo_loss -> backward -> clip -> step
    self.kl_ctl.update(...), self.curriculum.update(...)   β and harshness for the next iteration

Every formula is a pure function in ``chemlit.rl.ppo_math`` (the whole minibatch loss is
``ppo_loss``); this file only runs the networks and puts the formulas in order. A molecule's K
samples share a prefix (the prompt, or with ``ppo.rationale: greedy`` the prompt and the
molecule's greedy rationale up to "##Prediction:"): by default decoding and every forward pass
compute it once per molecule (``chemlit.models.shared_prefix``); ``ppo.decoding: plain`` uses
``model.generate`` and one ordinary forward pass instead (the same tokens and numbers, a shallow
stack to step through). Minibatches hold whole molecules.

With several processes (``trainer.strategy: ddp``) each rank rolls out its own share of the
molecules (Lightning's DistributedSampler); whatever is a statistic of "the batch" -- score and
advantage normalisation, explained variance, the KL controller's input, the curriculum's success
window, the logged metrics -- is reduced over all ranks; a group baseline stays per molecule.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Literal, Optional

import numpy as np
import torch

from chemlit.data.datamodule import IGNORE_INDEX, RationaleDataModule
from chemlit.data.prompts import parse_prediction
from chemlit.models.factory import LoraSpec, ModelSpec
from chemlit.models.shared_prefix import forward_plain, forward_with_shared_prefix
from chemlit.models.value_head import ValueHead, disable_dropout
from chemlit.rl import ppo_math as pm
from chemlit.rl.curriculum import Curriculum, CurriculumSpec
from chemlit.rl.kl import KLController, KLSpec
from chemlit.rl.rewards import (
    RewardSpec,
    ScoredAnswers,
    normalize_scores,
    score_answers,
)
from chemlit.stages.answering import AnsweringStage
from chemlit.stages.base import gradients_are_finite
from chemlit.stages.checkpoints import allow_in_checkpoints

log = logging.getLogger(__name__)


@dataclass
class PPOLora(LoraSpec):
    """PPO adapter: off by default (the tiny model trains all its weights). With LoRA on, the frozen
    reference is the same network with the adapter disabled -- no second copy in memory."""


@dataclass
class PPOSpec:
    """The PPO update."""

    samples_per_prompt: int = 8
    """K answers sampled for each molecule (the group a per-prompt baseline compares)."""
    rationale: str = "sampled"
    """sampled: each of the K samples writes its own rationale and number; RL trains both.
    greedy: the molecule's greedy rationale (what greedy evaluation writes) is written once and
    shared by its K samples, which sample only the answer line after "##Prediction:"; RL trains
    the number given the model's own reasoning, at a fraction of the cost per iteration."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are scored with logits divided by the same value."""
    max_new_tokens: int = 128
    """Longest rationale + answer (sampled) or greedy rationale (greedy); a sampled answer that is
    cut gets the no-answer penalty."""
    answer_max_new_tokens: int = 8
    """rationale=greedy: longest sampled answer line (" -123.5" and the end token fit in 8)."""
    ppo_epochs: int = 2
    """Passes over each iteration's samples."""
    num_minibatches: int = 4
    """Minibatches per pass (the samples of an iteration are split into this many)."""
    clip_range: float = 0.2
    """ε of the clipped policy ratio."""
    clip_range_value: float = 0.2
    """ε of the clipped value update."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of an entropy bonus (0 = none; the KL penalty already keeps the policy broad)."""
    gamma: float = 1.0
    """Discount; 1 because the only task reward comes at the end."""
    lam: float = 0.95
    """GAE λ."""
    max_grad_norm: float = 1.0
    """Gradient norm clip per minibatch."""
    value_head_learning_rate: Optional[float] = 1e-3
    """Learning rate of the zero-initialised value head (None = the policy's). A head trained at a
    policy-sized rate (5e-5) stayed at zero for a whole quickstart run (explained variance 0.00):
    a fresh linear head needs a far larger step than a pretrained network does."""
    ratio_threshold: float = 10.0
    """Skip (and count) a minibatch whose mean policy ratio over its tokens exceeds this: the
    policy has run away from the samples (a single rare token may legitimately move further)."""
    rationale_anchor: float = 0.0
    """Weight of the written rationale's negative log-likelihood in every minibatch's loss (the SFT
    targets of the minibatch's molecules, teacher-forced; the answer line is not in it). With
    rationale=greedy only the answer line is rewarded and the rationale drifts through the shared
    weights: in the 30-minute pipeline PPO's greedy rationales stated 57 % of the structural facts
    right against its SFT start's 69.5 %; the same PPO with the anchor at 1.0, 71.8 %. 0 = off.
    Costs one forward/backward of the minibatch's molecules (130 iterations in 7 minutes, not 152)."""
    decoding: Literal["fast", "plain"] = "fast"
    """fast: chemlit's cached decoding loop and shared-prefix forward passes. plain: ``model.generate``
    and one ordinary forward pass over [prompt, response] -- the same tokens and numbers (tested),
    slower, and a shallow stack to step through in a debugger."""


@dataclass
class Rollout:
    """One iteration's samples as plain tensors: G groups of K samples that share a prefix, B = G × K.

    The prefix is the prompt (rationale=sampled) or the prompt plus the greedy rationale and
    "##Prediction:" (rationale=greedy); the response is what was sampled after it.
    """

    prefix_ids: torch.Tensor       # (G, P) left-padded; group g's samples are rows g*K .. g*K+K-1
    prefix_mask: torch.Tensor      # (G, P)
    responses: torch.Tensor        # (B, T) sampled ids, right-padded
    response_mask: torch.Tensor    # (B, T) 1 on response tokens, up to and including the end token
    group_size: int                # K
    texts: list[str]               # decoded answers (rationale and answer line) for scoring and logs
    finished: list[bool]           # did the response end with the end token
    targets: list[float]           # measured value of each sample's molecule
    smiles: list[str]
    logprobs: Optional[torch.Tensor] = None      # (B, T) under the policy that sampled them (before the update)
    ref_logprobs: Optional[torch.Tensor] = None  # (B, T) under the frozen reference
    values: Optional[torch.Tensor] = None        # (B, T) critic before the update
    advantages: Optional[torch.Tensor] = None    # (B, T)
    returns: Optional[torch.Tensor] = None       # (B, T)
    greedy_texts: Optional[list[str]] = None     # (G) each molecule's greedy answer (reward.normalize=greedy)
    written_ids: Optional[torch.Tensor] = None    # (G, L) prompt + written rationale + answer (ppo.rationale_anchor)
    written_mask: Optional[torch.Tensor] = None   # (G, L)
    written_labels: Optional[torch.Tensor] = None  # (G, L) the written rationale's tokens, -100 elsewhere

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Row indices of the samples of ``groups`` (minibatches hold whole groups)."""
        K = self.group_size
        return (groups[:, None] * K + torch.arange(K, device=groups.device)).reshape(-1)

    def length(self, rows: torch.Tensor) -> int:
        """The longest response among ``rows``: a minibatch is cut to it (no pure-padding columns)."""
        return max(int(self.response_mask[rows].sum(1).max()), 1)


allow_in_checkpoints(PPOLora, PPOSpec, KLSpec, RewardSpec, CurriculumSpec)


# TensorBoard's "Custom Scalars" tab: the PPO story in the order one reads it, instead of ~25 cards
# sorted alphabetically. {category: {chart: ["Multiline", [tag regexes]]}}.
TENSORBOARD_LAYOUT = {
    "PPO 1: reward and success, one line per curriculum level": {
        "mean score of the sampled answers": ["Multiline", [r"curriculum/score_mean_.*"]],
        "success rate (reward >= reward.success_reward)": ["Multiline", [r"curriculum/success_rate_.*",
                                                                          r"ppo/window_success_rate"]],
        "tolerance (°C)": ["Multiline", [r"ppo/tolerance_c"]],
        "MAE (°C): sampled answers, greedy answers, validation": ["Multiline", [r"ppo/sample_mae", r"ppo/greedy_mae",
                                                                               r"val/mae"]],
    },
    "PPO 2: KL to the reference and β": {
        "KL per answer (k3 estimate, nats)": ["Multiline", [r"ppo/kl_per_sequence"]],
        "β (kl_coef)": ["Multiline", [r"ppo/kl_coef"]],
    },
    "PPO 3: policy": {
        "clip fraction": ["Multiline", [r"ppo/clipfrac"]],
        "approx_kl / old_approx_kl (old policy -> new)": ["Multiline", [r"ppo/approx_kl", r"ppo/old_approx_kl"]],
        "entropy": ["Multiline", [r"ppo/entropy"]],
        "policy loss": ["Multiline", [r"ppo/policy_loss"]],
    },
    "PPO 4: value": {
        "value loss": ["Multiline", [r"ppo/value_loss"]],
        "explained variance": ["Multiline", [r"ppo/explained_variance"]],
        "value clip fraction": ["Multiline", [r"ppo/value_clipfrac"]],
    },
    "PPO 5: throughput": {
        "samples / s": ["Multiline", [r"ppo/samples_per_second"]],
        "response length (tokens)": ["Multiline", [r"ppo/response_length"]],
        "skipped minibatches": ["Multiline", [r"ppo/skipped_minibatches"]],
    },
}


# Per-token negative log-likelihood of the written rationales above which the first iteration warns: an SFT
# model that learned them sits far below (about 0.1-0.3 nats); a model shown another style's rationales
# (data.rationale_style full vs the compact it learned) started at 12.7.
RATIONALE_NLL_WARNING = 3.0


class PhaseClock:
    """Wall time of each phase of one iteration (``lap(name)`` ends the phase running since the last
    lap), added to ``totals``: the run's time per phase, logged at the end of fit."""

    def __init__(self, totals: dict[str, float]):
        self.totals, self.laps = totals, {}
        self.started = self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self.last
        self.totals[phase] = self.totals.get(phase, 0.0) + self.laps[phase]
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.started


def response_mask_from_tokens(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) sampled ids -> (mask, finished): mask is 1 up to and including the first end token."""
    is_eos = responses == eos_token_id                          # (B, T)
    before_or_at = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) == 0  # (B, T) no end token earlier
    return before_or_at.long(), is_eos.any(dim=1)


class PPOModule(AnsweringStage):
    stage_name = "ppo"

    def __init__(
        self,
        model: ModelSpec = ModelSpec(source="pretrained"),
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ppo: PPOSpec = PPOSpec(),
        kl: KLSpec = KLSpec(),
        reward: RewardSpec = RewardSpec(),
        curriculum: CurriculumSpec = CurriculumSpec(),
        lora: PPOLora = PPOLora(),
        val_max_new_tokens: int = 192,
        val_generate_limit: Optional[int] = 256,
        log_examples: int = 4,
        export_dir: Optional[str] = None,
    ):
        """
        Args:
            model: the policy to start from, normally the SFT stage's export (source=pretrained).
            learning_rate: AdamW rate for policy and value head (constant after warm-up).
            weight_decay: AdamW weight decay (0: stay near the SFT model through the KL term only).
            warmup_steps: iterations of linear warm-up.
            ppo: the update (samples per prompt, temperature, epochs, minibatches, clipping...).
            kl: the penalty to the frozen reference (coefficient, fixed/adaptive, estimator and where it goes).
            reward: scoring (no-answer penalty, success threshold, score normalisation).
            curriculum: harshness levels (tolerances in °C), thresholds and window.
            lora: adapter; with it the reference is the adapter-disabled network.
            val_max_new_tokens: longest greedy answer in validation/test.
            val_generate_limit: validation molecules answered per validation (None = all).
            log_examples: sampled answers written to TensorBoard text per logging step.
            export_dir: where the trained policy goes; default <log_dir>/export.
        """
        super().__init__(model, learning_rate, weight_decay, warmup_steps, export_dir)
        if ppo.rationale not in ("sampled", "greedy"):
            raise ValueError(f"ppo.rationale must be 'sampled' or 'greedy', got {ppo.rationale!r}")
        if ppo.decoding not in ("fast", "plain"):
            raise ValueError(f"ppo.decoding must be 'fast' or 'plain', got {ppo.decoding!r}")
        if ppo.rationale_anchor < 0:
            raise ValueError(f"ppo.rationale_anchor must be >= 0, got {ppo.rationale_anchor}")
        self.lora = lora
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.ppo = ppo
        self.plain_decoding = ppo.decoding == "plain"
        self.kl_spec = kl
        self.reward_spec = reward
        self.curriculum_spec = curriculum
        self.kl_ctl = KLController(kl)
        self.curriculum = Curriculum(curriculum)
        self.val_max_new_tokens = val_max_new_tokens
        self.val_generate_limit = val_generate_limit
        self.log_examples = log_examples
        self.value_head: Optional[ValueHead] = None
        self.skipped_minibatches = 0
        self.iteration = 0  # PPO iterations done (Lightning's global_step counts optimizer steps)
        self.sampling_seed: Optional[int] = None  # root of every rank's sampling stream (sampling_stream)
        self.phase_seconds: dict[str, float] = {}  # wall time per phase of the iteration, summed over the run
        self.molecules_seen = 0                    # molecules rolled out, all ranks

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.ppo.rationale_anchor and not getattr(datamodule, "use_rationale", True):
            raise ValueError("ppo.rationale_anchor > 0 holds the model to its written rationales, but "
                             "data.use_rationale is false: there are none")
        if self.sampling_seed is None:  # Lightning's seed_everything; a resumed run takes the checkpoint's
            self.sampling_seed = torch.initial_seed()
        if self.value_head is None:
            disable_dropout(self.model)
            self.value_head = ValueHead(self.model.config.hidden_size)
        if stage == "fit" and not self.uses_lora and "reference" not in self.__dict__:
            # The frozen reference is the start model. It is kept out of the module's registered
            # children (object.__setattr__), so checkpoints do not store a second copy of the
            # network: setup() runs before a checkpoint's weights are loaded, so a resumed run
            # rebuilds it from `model` exactly as the first run did.
            object.__setattr__(self, "reference", copy.deepcopy(self.model).requires_grad_(False).eval())

    def on_fit_start(self) -> None:
        if not self.uses_lora:  # not a registered child: it moves with the policy by hand
            self.reference.to(self.device)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_custom_scalars"):
            experiment.add_custom_scalars(TENSORBOARD_LAYOUT)

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.enabled

    def forward_policy(self, rollout: Rollout, groups: torch.Tensor, length: int,
                       network=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits (divided by the temperature) and values at the first ``length`` response tokens of ``groups``.

        -> (b, length, V), (b, length) for the b = len(groups) × K rows. ``network`` (default: the
        policy) is the reference for reference log-probs, which need no values. Fast: each group's
        prefix is computed once and shared by its K samples; plain: one forward pass over the
        repeated [prefix, response] rows. Same numbers (tests/test_shared_prefix.py).
        """
        rows = rollout.rows(groups)
        with_values = network is None
        forward = forward_plain if self.plain_decoding else forward_with_shared_prefix
        logits, hidden = forward(network or self.model, rollout.prefix_ids[groups], rollout.prefix_mask[groups],
                                 rollout.responses[rows, :length], rollout.response_mask[rows, :length],
                                 rollout.group_size, with_hidden=with_values)
        values = self.value_head(hidden) if with_values else None                 # (b, length)
        return self.tempered(logits), values

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        """logits / temperature: the distribution the samples were drawn from (no copy at T = 1)."""
        return logits if self.ppo.temperature == 1.0 else logits / self.ppo.temperature

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, groups: torch.Tensor, length: int) -> torch.Tensor:
        """(b, length) log-probs of the sampled responses of ``groups`` under the frozen reference."""
        responses = rollout.responses[rollout.rows(groups), :length]
        if self.uses_lora:
            with self.model.disable_adapter():
                logits, _ = self.forward_policy(rollout, groups, length, network=self.model)
        else:
            logits, _ = self.forward_policy(rollout, groups, length, network=self.reference)
        return pm.logprobs_from_logits(logits, responses)

    # ------------------------------------------------------------------ the story of one iteration
    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        """Sample K answers per prompt with temperature, no top-k/top-p; keep the sampled ids.

        rationale=sampled: the K samples continue the prompt. rationale=greedy: first the greedy
        rationale up to "##Prediction:" (once per molecule), then K answer lines after it.
        """
        K, pad, eos = self.ppo.samples_per_prompt, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prefix_ids, prefix_mask = batch["prompt_ids"], batch["prompt_mask"]         # (G, P)
        rationales, greedy_texts = [""] * prefix_ids.size(0), None
        if self.ppo.rationale == "greedy":
            prefix_ids, prefix_mask, rationales, greedy_texts = self.greedy_rationales(prefix_ids, prefix_mask)
            max_new_tokens = self.ppo.answer_max_new_tokens
        else:
            max_new_tokens = self.ppo.max_new_tokens
            if self.reward_spec.normalize == "greedy":  # the baseline: what greedy decoding answers
                _, greedy_texts = self.write_answers(prefix_ids, prefix_mask, max_new_tokens)
        responses = self.decode(prefix_ids, prefix_mask, K, max_new_tokens, self.ppo.temperature)   # (B, T)
        response_mask, finished = response_mask_from_tokens(responses, eos)
        # Tokens after the end token are not part of the answer: decode them as padding (not as id 0,
        # which is a real token in most pretrained vocabularies).
        answers = self.tokenizer.batch_decode(responses.masked_fill(response_mask == 0, pad), skip_special_tokens=True)
        texts = [rationales[i // K] + answer for i, answer in enumerate(answers)]
        targets = batch["targets"].repeat_interleave(K).tolist()
        smiles = [s for s in batch["smiles"] for _ in range(K)]
        written = {}
        if self.ppo.rationale_anchor and "rationale_ids" in batch:
            written = dict(written_ids=batch["rationale_ids"], written_mask=batch["rationale_mask"],
                           written_labels=batch["rationale_labels"])
        return Rollout(prefix_ids, prefix_mask, responses, response_mask, K, texts, finished.tolist(), targets,
                       smiles, greedy_texts=greedy_texts, **written)

    @torch.no_grad()
    def greedy_rationales(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        """Prompt + greedy rationale + "##Prediction:" per molecule, left-padded; the rationale texts;
        and the whole greedy answers (what greedy evaluation would answer).

        The rationale is cut after the answer marker where the parser reads (the last one); a
        rationale without one (cut by max_new_tokens, or ended early) gets the marker appended, so
        every sample answers.
        """
        written, greedy_texts = self.write_answers(prompt_ids, prompt_mask, self.ppo.max_new_tokens)  # (G, T)
        ids, mask, parts = self.answer_line_prompts(prompt_ids, prompt_mask, written)
        texts = [self.tokenizer.decode(part, skip_special_tokens=True) for part in parts]
        return ids, mask, texts, greedy_texts

    def score(self, rollout: Rollout) -> ScoredAnswers:
        """Parse each answer and grade its error at the curriculum's current tolerance."""
        return score_answers(rollout.texts, rollout.finished, rollout.targets, self.curriculum.tolerance_c,
                             self.reward_spec, group_size=rollout.group_size)

    def score_greedy(self, rollout: Rollout) -> Optional[ScoredAnswers]:
        """Each molecule's greedy answer graded like the samples (G,): the baseline of
        normalize=greedy, and ppo/greedy_mae. None when the rollout did not write them."""
        if rollout.greedy_texts is None:
            return None
        return score_answers(rollout.greedy_texts, [True] * len(rollout.greedy_texts),
                             rollout.targets[::rollout.group_size], self.curriculum.tolerance_c, self.reward_spec)

    def normalized_scores(self, scored: ScoredAnswers, greedy: Optional[ScoredAnswers]) -> torch.Tensor:
        """(B,) rewards compared with their baseline (reward.normalize), scaled over the whole batch of all ranks."""
        return normalize_scores(scored.rewards.to(self.device), self.ppo.samples_per_prompt,
                                self.reward_spec.normalize,
                                baseline=greedy.rewards.to(self.device) if greedy is not None else None,
                                reduce_sum=self.all_reduce_sum)

    def minibatch_plan(self, groups: int) -> list[list[torch.Tensor]]:
        """For each PPO epoch, the G molecules in a random order split into ``num_minibatches``
        minibatches whose sizes differ by at most one molecule (a molecule's K samples stay together)."""
        plan = []
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(groups, device=self.device)
            plan.append([part for part in order.tensor_split(min(self.ppo.num_minibatches, groups))])
        return plan

    @torch.no_grad()
    def evaluate(self, rollout: Rollout, minibatches: list[torch.Tensor]) -> None:
        """Old log-probs and values from the very forward the update runs on the same minibatches
        (so the first minibatch's ratio is exactly 1), and the reference's log-probs."""
        mask = rollout.response_mask
        logprobs = torch.zeros(mask.shape, device=self.device)                     # (B, T)
        values = torch.zeros(mask.shape, device=self.device)                       # (B, T)
        ref_logprobs = torch.zeros(mask.shape, device=self.device)                 # (B, T)
        for groups in minibatches:  # minibatch by minibatch: the same shapes, and smaller passes run faster
            rows = rollout.rows(groups)
            T = rollout.length(rows)
            logits, minibatch_values = self.forward_policy(rollout, groups, T)      # (b, T, V), (b, T)
            logprobs[rows, :T] = pm.logprobs_from_logits(logits, rollout.responses[rows, :T])
            values[rows, :T] = minibatch_values
            ref_logprobs[rows, :T] = self.reference_logprobs(rollout, groups, T)
        rollout.logprobs, rollout.values, rollout.ref_logprobs = logprobs * mask, values * mask, ref_logprobs * mask

    @torch.no_grad()
    def token_rewards(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token rewards: the normalised score on the last response token, -β·k1 on every
        token when the KL penalty is in the reward (kl.where: reward)."""
        beta_in_reward = self.kl_ctl.value if self.kl_spec.where == "reward" else 0.0
        return pm.token_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask,
                                beta_in_reward, self.kl_spec.kind)                        # (B, T)

    @torch.no_grad()
    def advantages(self, rollout: Rollout, token_rewards: torch.Tensor) -> None:
        """GAE advantages and returns into the rollout. The scores are centred once, against their
        baseline (reward.normalize: group mean, greedy answer); the advantages are then only scaled to
        unit RMS over the whole batch (all ranks), not centred again. normalize none or batch: whitened."""
        mask = rollout.response_mask
        advantages, returns = pm.gae(token_rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)  # (B, T)
        if self.reward_spec.normalize in ("group", "greedy"):  # centred once already, against the baseline
            rollout.advantages = pm.masked_scale(advantages, mask, self.all_reduce_sum) * mask
        else:
            rollout.advantages = pm.masked_whiten(advantages, mask, reduce_sum=self.all_reduce_sum) * mask
        rollout.returns = returns

    def loss_spec(self, anchor: bool = False) -> pm.LossSpec:
        """The loss's weights now (β moves with the KL controller); ``anchor``: the minibatch carries the
        written rationales' log-probs (ppo.rationale_anchor)."""
        kl_in_loss = self.kl_ctl.value if self.kl_spec.where == "loss" else 0.0
        return pm.LossSpec(clip_range=self.ppo.clip_range, clip_range_value=self.ppo.clip_range_value,
                           vf_coef=self.ppo.vf_coef, ent_coef=self.ppo.ent_coef, kl_loss_coef=kl_in_loss,
                           anchor_coef=self.ppo.rationale_anchor if anchor else 0.0)

    def written_logprobs(self, rollout: Rollout, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, L-1) log-probs of each next token of the molecules' written examples (teacher-forced), and
        True on the written rationale's tokens: ppo_loss's anchor (ppo.rationale_anchor)."""
        ids, labels = rollout.written_ids[groups], rollout.written_labels[groups]
        logits = self.model(input_ids=ids, attention_mask=rollout.written_mask[groups]).logits[:, :-1]  # (g, L-1, V)
        targets = labels[:, 1:]                                                      # (g, L-1)
        mask = targets != IGNORE_INDEX
        return pm.logprobs_from_logits(logits, targets.clamp(min=0)), mask

    def update(self, rollout: Rollout, groups: torch.Tensor) -> Optional[dict]:
        """One clipped PPO step on the samples of ``groups``; None if the minibatch was skipped."""
        rows = rollout.rows(groups)                                                  # (b,)
        T = rollout.length(rows)
        logits, values = self.forward_policy(rollout, groups, T)                     # (b, T, V), (b, T)
        logprobs = pm.logprobs_from_logits(logits, rollout.responses[rows, :T])      # (b, T)
        if self.ppo.ent_coef:
            entropy = pm.token_entropy(logits)                                       # (b, T)
        else:  # logged only: no gradient through a softmax over the vocabulary that the loss weighs by 0
            with torch.no_grad():
                entropy = pm.token_entropy(logits)
        written_logprobs = written_mask = None
        if rollout.written_ids is not None:  # only there with ppo.rationale_anchor
            written_logprobs, written_mask = self.written_logprobs(rollout, groups)  # (g, L-1)
        loss, stats = pm.ppo_loss(logprobs, values, rollout.logprobs[rows, :T], rollout.values[rows, :T],
                                  rollout.advantages[rows, :T], rollout.returns[rows, :T],
                                  rollout.response_mask[rows, :T], self.loss_spec(written_logprobs is not None),
                                  ref_logprobs=rollout.ref_logprobs[rows, :T], entropy=entropy,
                                  anchor_logprobs=written_logprobs, anchor_mask=written_mask)
        bad = ~torch.isfinite(loss) | (stats["ratio_mean"] > self.ppo.ratio_threshold)
        if self._any_rank(bad):  # every rank skips together, or DDP would wait forever
            self.skipped_minibatches += 1
            return None
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if not gradients_are_finite(self):  # a finite loss can still give a NaN gradient: skip that step too
            optimizer.zero_grad(set_to_none=True)
            self.skipped_minibatches += 1
            return None
        self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        return stats

    def training_step(self, batch: dict, batch_idx: int) -> None:
        clock = PhaseClock(self.phase_seconds)
        self.model.eval()  # no dropout and no train-only behaviour, in rollout and update alike
        with self.sampling_stream():
            rollout = self.rollout(batch)                      # (B, T) sampled ids, B = G molecules × K
        clock.lap("rollout")
        scored = self.score(rollout)                           # (B,) graded rewards (or group credits)
        greedy = self.score_greedy(rollout)                    # (G,) or None
        scores = self.normalized_scores(scored, greedy)        # (B,)
        clock.lap("score")
        plan = self.minibatch_plan(rollout.prefix_ids.size(0))
        self.evaluate(rollout, plan[0])                        # old log-probs, values, reference log-probs
        token_rewards = self.token_rewards(rollout, scores)    # (B, T)
        self.advantages(rollout, token_rewards)                # rollout.advantages, rollout.returns (B, T)
        clock.lap("evaluate")
        stats = []
        for groups in chain(*plan):                            # ppo_epochs x num_minibatches, molecule indices
            result = self.update(rollout, groups)              # None: skipped (non-finite loss, runaway ratio)
            if result is not None:
                stats.append(result)
        clock.lap("update")
        self.iteration += 1
        self.molecules_seen += rollout.prefix_ids.size(0) * self.trainer.world_size
        graded_with = (self.kl_ctl.value, self.curriculum.level)     # what this iteration used
        kl_per_sequence = self.kl_per_sequence(rollout)              # k3, mean over all ranks' answers
        self.kl_ctl.update(float(kl_per_sequence), self.samples_all_ranks(rollout))     # β for the next iteration
        self.curriculum.update(self._gather_successes(scored.successes), self.iteration)  # harshness for the next
        self._after_iteration(rollout, scored, greedy, token_rewards, stats, graded_with, kl_per_sequence, clock)

    @contextmanager
    def sampling_stream(self):
        """Random numbers of this rank's own for this iteration's sampling: the generator is seeded from
        (sampling_seed, rank, iteration), so two ranks given the same prompts draw different samples and
        a resumed run draws what the uninterrupted run drew. The global random state is left as it was."""
        seed = int(np.random.SeedSequence([self.sampling_seed % 2 ** 63, self.global_rank, self.iteration])
                   .generate_state(1, dtype=np.uint64)[0] % 2 ** 63)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def kl_per_sequence(self, rollout: Rollout) -> torch.Tensor:
        """The KL's value per answer, estimated with k3 (unbiased, never negative), over all ranks."""
        mask = rollout.response_mask.float()
        kl_tokens = pm.kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k3") * mask        # (B, T)
        return pm.masked_mean(kl_tokens.sum(1), torch.ones(mask.size(0), device=self.device), self.all_reduce_sum)

    def samples_all_ranks(self, rollout: Rollout) -> int:
        return rollout.responses.size(0) * self.trainer.world_size

    # ------------------------------------------------------------------ bookkeeping
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over all ranks (itself with one process): ppo_math's ``reduce_sum``."""
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(x, reduce_op="sum")
        return x

    def _any_rank(self, flag: torch.Tensor) -> bool:
        return bool(self.all_reduce_sum(flag.float()).item() > 0)

    def _gather_successes(self, successes: list[bool]) -> list[bool]:
        local = torch.tensor(successes, dtype=torch.float32, device=self.device)
        if self.trainer.world_size > 1:
            local = self.all_gather(local).reshape(-1)
        return [bool(s) for s in local.tolist()]

    def _after_iteration(self, rollout: Rollout, scored: ScoredAnswers, greedy: Optional[ScoredAnswers],
                         token_rewards: torch.Tensor, stats: list[dict], graded_with: tuple[float, int],
                         kl_per_sequence: torch.Tensor, clock: "PhaseClock") -> None:
        """Log the iteration: the metrics, per-level curves, sample texts and announcements."""
        mask = rollout.response_mask.float()
        B = mask.size(0)
        beta, level_before = graded_with
        tolerance_c = self.curriculum.spec.tolerances_c[level_before]
        if self.iteration == 1 and stats and "rationale_nll" in stats[0]:
            nll = float(torch.stack([s["rationale_nll"] for s in stats]).mean())
            if nll > RATIONALE_NLL_WARNING:
                log.warning("ppo.rationale_anchor: the written rationales cost the model %.1f nats per token: it "
                            "did not learn to write them (is data.rationale_style the style its SFT stage used?); "
                            "the anchor will pull it towards them", nll)
        if self.curriculum.level != level_before:
            print(f"chemlit: curriculum level {level_before} -> {self.curriculum.level} "
                  f"(tolerance {self.curriculum.tolerance_c:g} °C) at iteration {self.iteration}")
        scalars = {
            "ppo/score_mean": scored.rewards.mean(), "ppo/score_std": scored.rewards.std(unbiased=False),
            "ppo/sample_mae": scored.mae,
            "ppo/parse_rate": scored.parse_rate, "ppo/success_rate": float(np.mean(scored.successes)),
            "ppo/kl_per_sequence": kl_per_sequence, "ppo/kl_coef": beta,
            "ppo/reward_total": (token_rewards * mask).sum(1).mean(),
            "ppo/explained_variance": pm.explained_variance(rollout.values, rollout.returns, mask, self.all_reduce_sum),
            "ppo/response_length": mask.sum(1).mean(), "ppo/harshness_level": float(level_before),
            "ppo/tolerance_c": tolerance_c,
            "ppo/window_success_rate": self.curriculum.success_rate,
            "ppo/skipped_minibatches": float(self.skipped_minibatches),
            "ppo/samples_per_second": B * self.trainer.world_size / max(clock.total, 1e-9),
            "ppo/molecules_seen": float(self.molecules_seen),
            **{f"time/{phase}_s": seconds for phase, seconds in clock.laps.items()},
        }
        if greedy is not None:  # what greedy decoding answers for this batch's molecules
            scalars["ppo/greedy_mae"] = greedy.mae
        for key in (stats[0] if stats else {}):
            scalars[f"ppo/{key}"] = torch.stack([s[key] for s in stats]).mean()
        for key, value in scalars.items():
            # sync_dist: the mean over ranks (samples_per_second is already the total)
            self.log(key, torch.as_tensor(value, dtype=torch.float32, device=self.device), sync_dist=True,
                     prog_bar=key in ("ppo/score_mean", "ppo/sample_mae", "ppo/tolerance_c"), batch_size=B)
        self._log_per_level(scored, tolerance_c)
        self._log_samples(rollout, scored)

    def _log_per_level(self, scored: ScoredAnswers, tolerance_c: float) -> None:
        """The reward and success rate (over all ranks) under the name of the level they were graded at:
        one line per level in TensorBoard's custom-scalars layout (a score at 100 °C is not one at 25 °C).
        Written to TensorBoard directly: Lightning's self.log repeats a key's last value at every later
        step, which would draw a finished level as a flat line."""
        everything = torch.ones(scored.rewards.numel(), device=self.device)
        score = pm.masked_mean(scored.rewards.to(self.device), everything, self.all_reduce_sum)
        success = pm.masked_mean(torch.tensor(scored.successes, dtype=torch.float32, device=self.device), everything,
                                 self.all_reduce_sum)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_scalar"):
            step = self.iteration - 1   # the step Lightning gives this iteration's self.log values
            experiment.add_scalar(f"curriculum/score_mean_{tolerance_c:g}C", float(score), step)
            experiment.add_scalar(f"curriculum/success_rate_{tolerance_c:g}C", float(success), step)

    def _log_samples(self, rollout: Rollout, scored: ScoredAnswers) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text") or (self.iteration - 1) % max(self.trainer.log_every_n_steps, 1):
            return
        lines = [f"**{s}** (measured {t:g} °C, reward {r:+.2f})\n\n{text}" for s, t, r, text in
                 zip(rollout.smiles, rollout.targets, scored.rewards.tolist(), rollout.texts)][: self.log_examples]
        experiment.add_text("ppo/samples", "\n\n---\n\n".join(lines), self.global_step)

    # ------------------------------------------------------------------ optimiser, checkpoints
    def configure_optimizers(self):
        policy = [p for p in self.model.parameters() if p.requires_grad]
        value_lr = self.ppo.value_head_learning_rate or self.learning_rate
        optimizer = torch.optim.AdamW([{"params": policy, "lr": self.learning_rate, "initial_lr": self.learning_rate},
                                       {"params": list(self.value_head.parameters()), "lr": value_lr,
                                        "initial_lr": value_lr}],
                                      weight_decay=self.weight_decay, eps=1e-5)
        return optimizer

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.warmup_steps:
            scale = min((self.iteration + 1) / self.warmup_steps, 1.0)  # warm-up counted in iterations
            for group in self.optimizers().param_groups:
                group["lr"] = group["initial_lr"] * scale

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
               "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
               "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["chemlit_ppo"] = {
            "kl_controller": self.kl_ctl.state_dict(), "curriculum": self.curriculum.state_dict(),
            "skipped_minibatches": self.skipped_minibatches, "iteration": self.iteration, "rng": rng,
            "sampling_seed": self.sampling_seed, "molecules_seen": self.molecules_seen,
            "phase_seconds": dict(self.phase_seconds),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("chemlit_ppo")
        if state is None:
            return
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.skipped_minibatches = int(state["skipped_minibatches"])
        self.iteration = int(state.get("iteration", 0))
        self.sampling_seed = state.get("sampling_seed", self.sampling_seed)
        self.molecules_seen = int(state.get("molecules_seen", 0))
        self.phase_seconds = dict(state.get("phase_seconds", {}))
        self._rng_to_restore = state["rng"]

    def on_train_end(self) -> None:
        """One line on where the time went and how much of the training split PPO saw."""
        total = sum(self.phase_seconds.values())
        if not total or not self.trainer.is_global_zero:
            return
        phases = ", ".join(f"{phase} {seconds:.0f} s ({seconds / total:.0%})" for phase, seconds in self.phase_seconds.items())
        datamodule = self.trainer.datamodule
        train = len(datamodule.examples("train")) if isinstance(datamodule, RationaleDataModule) else None
        share = f" of {train} training molecules ({self.molecules_seen / train:.0%})" if train else ""
        log.info("PPO: %d iterations, %s; %d molecules rolled out%s", self.iteration, phases, self.molecules_seen, share)

    def on_train_start(self) -> None:
        super().on_train_start()
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:  # restored here, after Lightning's own seeding, so the resumed run continues exactly
            torch.set_rng_state(torch.as_tensor(rng["torch"], dtype=torch.uint8))
            random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
            np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
            self._rng_to_restore = None

    # ------------------------------------------------------------------ validation / test (AnsweringStage): greedy
    @torch.no_grad()
    def answer_batch(self, batch: dict) -> tuple[list[str], torch.Tensor]:
        """Greedy answers and their numbers (NaN where none parses): what validation and test score."""
        _, texts = self.write_answers(batch["prompt_ids"], batch["prompt_mask"], self.val_max_new_tokens)
        return texts, self.as_tensor([parse_prediction(t) for t in texts])

    def export_info(self) -> dict:
        info = super().export_info()
        info["curriculum_history"] = self.curriculum.history
        return info
