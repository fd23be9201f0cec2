"""RL: a hand-written PPO that rewards the right melting point.

One training step is one PPO iteration, and reads as the algorithm does:

    rollout  = self.rollout(batch)           sample K answers per molecule: token ids, log-probs, values
    scored   = self.score(rollout)            parse, error, reward at the curriculum's harshness
    self.evaluate(rollout)                    reference log-probs
    self.advantages(rollout, scores)          KL-penalised token rewards -> GAE -> whitened advantages
    for epoch in ppo_epochs: for minibatch:   self.update(minibatch): clipped policy + value + entropy

Every formula is a pure function in ``chemlit.rl.ppo_math``; this file only puts them in order.
A molecule's K samples share a prefix (the prompt, or with ``ppo.rationale: greedy`` the prompt and
the molecule's greedy rationale up to "##Prediction:"): decoding and every forward pass compute it
once per molecule (``chemlit.models.shared_prefix``), and minibatches hold whole molecules.
The design avoids each thing that made the original TRL run flat (see ../shared/DESIGN.md): K
samples per prompt with temperature, sampled ids never re-tokenised, a small KL coefficient with an
unbiased non-negative estimator, an adaptive controller whose horizon is in samples, per-prompt
score baselines, advantages whitened over the whole batch, and a lenient-first curriculum.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from chemlit.data.datamodule import pad_left
from chemlit.data.prompts import ANSWER_MARKER, marker_ends, parse_prediction
from chemlit.eval.metrics import PredictionMetrics
from chemlit.models.factory import LoraSpec, ModelSpec
from chemlit.models.shared_prefix import decode_after_prefix, forward_with_shared_prefix
from chemlit.models.value_head import ValueHead, disable_dropout
from chemlit.rl import ppo_math as pm
from chemlit.rl.curriculum import Curriculum, CurriculumSpec
from chemlit.rl.kl import KLController, KLSpec
from chemlit.rl.rewards import RewardSpec, ScoredAnswers, normalize_scores, score_answers
from chemlit.stages.base import StageModule, allow_in_checkpoints

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
    logprobs: Optional[torch.Tensor] = None      # (B, T) under the sampling policy
    ref_logprobs: Optional[torch.Tensor] = None  # (B, T) under the frozen reference
    values: Optional[torch.Tensor] = None        # (B, T) critic before the update
    advantages: Optional[torch.Tensor] = None    # (B, T)
    returns: Optional[torch.Tensor] = None       # (B, T)
    greedy_texts: Optional[list[str]] = None     # (G) each molecule's greedy answer (reward.normalize=greedy)

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Row indices of the samples of ``groups`` (minibatches hold whole groups)."""
        K = self.group_size
        return (groups[:, None] * K + torch.arange(K, device=groups.device)).reshape(-1)


allow_in_checkpoints(PPOLora, PPOSpec, KLSpec, RewardSpec, CurriculumSpec)


def response_mask_from_tokens(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) sampled ids -> (mask, finished): mask is 1 up to and including the first end token."""
    is_eos = responses == eos_token_id                          # (B, T)
    before_or_at = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) == 0  # (B, T) no end token earlier
    return before_or_at.long(), is_eos.any(dim=1)


class PPOModule(StageModule):
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
            kl: the penalty to the frozen reference (coefficient, fixed/adaptive, estimator).
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
        self.lora = lora
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.ppo = ppo
        self.kl_spec = kl
        self.reward_spec = reward
        self.curriculum_spec = curriculum
        self.kl_ctl = KLController(kl)
        self.curriculum = Curriculum(curriculum)
        self.val_max_new_tokens = val_max_new_tokens
        self.val_generate_limit = val_generate_limit
        self.log_examples = log_examples
        self.value_head: Optional[ValueHead] = None
        self.reference = None
        self.skipped_minibatches = 0
        self.iteration = 0  # PPO iterations done (Lightning's global_step counts optimizer steps)
        self.val_metrics = PredictionMetrics()
        self.test_metrics = PredictionMetrics()
        self._val_generated = 0

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.value_head is None:
            disable_dropout(self.model)
            self.value_head = ValueHead(self.model.config.hidden_size)
            if not self.uses_lora:
                self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.enabled

    def forward_policy(self, rollout: Rollout, groups: torch.Tensor, length: Optional[int] = None,
                       with_values: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits (divided by the temperature) and values at the response tokens of ``groups``.

        -> (b, T, V), (b, T) for the b = len(groups) × K rows, T = ``length`` (default: the whole
        response width). Each group's prefix is computed once and shared by its K samples
        (chemlit.models.shared_prefix): same numbers as a forward pass over the K repeated rows, a
        fraction of the work.
        """
        rows = rollout.rows(groups)
        length = length or rollout.responses.size(1)
        logits, hidden = forward_with_shared_prefix(
            self.model, rollout.prefix_ids[groups], rollout.prefix_mask[groups], rollout.responses[rows, :length],
            rollout.response_mask[rows, :length], rollout.group_size, with_hidden=with_values)
        values = self.value_head(hidden) if with_values else None                 # (b, T)
        return self.tempered(logits), values

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        """logits / temperature: the distribution the samples were drawn from (no copy at T = 1)."""
        return logits if self.ppo.temperature == 1.0 else logits / self.ppo.temperature

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) log-probs of the sampled responses under the frozen reference."""
        args = (rollout.prefix_ids, rollout.prefix_mask, rollout.responses, rollout.response_mask, rollout.group_size)
        if self.uses_lora:
            with self.model.disable_adapter():
                logits, _ = forward_with_shared_prefix(self.model, *args)
        else:
            logits, _ = forward_with_shared_prefix(self.reference, *args)
        return pm.logprobs_from_logits(self.tempered(logits), rollout.responses)

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
        # The loop also returns each sampled token's log-prob and hidden state: the old policy's
        # log-probs and the critic's input, so `evaluate` needs no second forward pass of the policy.
        responses, logprobs, hidden = decode_after_prefix(self.model, prefix_ids, prefix_mask, K, max_new_tokens,
                                                          eos, pad, temperature=self.ppo.temperature,
                                                          with_scores=True)          # (B, T), (B, T), (B, T, H)
        response_mask, finished = response_mask_from_tokens(responses, eos)
        # Tokens after the end token are not part of the answer: decode them as padding (not as id 0,
        # which is a real token in most pretrained vocabularies).
        answers = self.tokenizer.batch_decode(responses.masked_fill(response_mask == 0, pad), skip_special_tokens=True)
        texts = [rationales[i // K] + answer for i, answer in enumerate(answers)]
        targets = batch["targets"].repeat_interleave(K).tolist()
        smiles = [s for s in batch["smiles"] for _ in range(K)]
        return Rollout(prefix_ids, prefix_mask, responses, response_mask, K, texts, finished.tolist(), targets,
                       smiles, logprobs=logprobs * response_mask, values=self.value_head(hidden) * response_mask,
                       greedy_texts=greedy_texts)

    @torch.no_grad()
    def greedy_rationales(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        """Prompt + greedy rationale + "##Prediction:" per molecule, left-padded; the rationale texts;
        and the whole greedy answers (what greedy evaluation would answer).

        The rationale is cut after the first answer marker the model writes; a rationale without
        one (cut by max_new_tokens, or ended early) gets the marker appended, so every sample answers.
        """
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        written, greedy_texts = self.write_answers(prompt_ids, prompt_mask, self.ppo.max_new_tokens)  # (G, T)
        marker = self.tokenizer.encode(ANSWER_MARKER, add_special_tokens=False)
        newline_marker = self.tokenizer.encode("\n" + ANSWER_MARKER, add_special_tokens=False)
        prefixes, texts = [], []
        for b in range(written.size(0)):
            tokens = [t for t in written[b].tolist() if t not in (pad, eos)]
            ends = marker_ends(tokens, marker)
            tokens = tokens[:ends[0]] if ends else tokens + newline_marker
            prefixes.append(prompt_ids[b][prompt_mask[b].bool()].tolist() + tokens)
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        ids = pad_left(prefixes, pad, None).to(prompt_ids.device)
        mask = pad_left([[1] * len(p) for p in prefixes], 0, None).to(prompt_ids.device)
        return ids, mask, texts, greedy_texts

    def score(self, rollout: Rollout) -> ScoredAnswers:
        """Parse each answer and grade its error at the curriculum's current tolerance."""
        return score_answers(rollout.texts, rollout.finished, rollout.targets, self.curriculum.tolerance_c,
                             self.reward_spec)

    def score_greedy(self, rollout: Rollout) -> Optional[ScoredAnswers]:
        """Each molecule's greedy answer graded like the samples (G,): the baseline of
        normalize=greedy, and ppo/greedy_mae. None when the rollout did not write them."""
        if rollout.greedy_texts is None:
            return None
        return score_answers(rollout.greedy_texts, [True] * len(rollout.greedy_texts),
                             rollout.targets[::rollout.group_size], self.curriculum.tolerance_c, self.reward_spec)

    @torch.no_grad()
    def evaluate(self, rollout: Rollout) -> None:
        """The reference's log-probs. The sampling policy's log-probs and values are already in the
        rollout: the decoding loop that sampled the tokens computed them."""
        rollout.ref_logprobs = self.reference_logprobs(rollout)                    # (B, T)

    @torch.no_grad()
    def advantages(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Token rewards (KL penalty + score at the end) -> GAE -> advantages whitened over the batch."""
        mask = rollout.response_mask
        rewards = pm.token_rewards(scores.to(self.device), rollout.logprobs, rollout.ref_logprobs, mask,
                                   self.kl_ctl.value, self.kl_spec.kind)                      # (B, T)
        advantages, returns = pm.gae(rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)  # (B, T)
        if self.reward_spec.normalize == "greedy":  # scaled, not re-centred: 'better than greedy' stays > 0
            rollout.advantages = advantages / pm.masked_mean(advantages ** 2, mask).sqrt().clamp(min=1e-6) * mask
        else:                                      # whitened over the whole batch
            rollout.advantages = pm.masked_whiten(advantages, mask) * mask
        rollout.returns = returns
        return rewards

    def update(self, rollout: Rollout, groups: torch.Tensor) -> Optional[dict]:
        """One clipped PPO step on the samples of ``groups``; None if the minibatch was skipped."""
        index = rollout.rows(groups)                                                # (b,)
        T = int(rollout.response_mask[index].sum(1).max())  # this minibatch's longest response: no pure-padding columns
        mask = rollout.response_mask[index, :T]                                     # (b, T)
        old_logprobs, old_values = rollout.logprobs[index, :T], rollout.values[index, :T]
        logits, values = self.forward_policy(rollout, groups, T)                    # (b, T, V), (b, T)
        logprobs = pm.logprobs_from_logits(logits, rollout.responses[index, :T])    # (b, T)
        pg_loss, pg_clipfrac, approx_kl = pm.policy_loss(logprobs, old_logprobs, rollout.advantages[index, :T], mask,
                                                         self.ppo.clip_range)
        v_loss, v_clipfrac = pm.value_loss(values, old_values, rollout.returns[index, :T], mask,
                                           self.ppo.clip_range_value)
        if self.ppo.ent_coef:
            entropy = pm.entropy_from_logits(logits, mask)
            loss = pg_loss + self.ppo.vf_coef * v_loss - self.ppo.ent_coef * entropy
        else:  # logged only: no gradient through a softmax over the vocabulary that the loss weighs by 0
            with torch.no_grad():
                entropy = pm.entropy_from_logits(logits, mask)
            loss = pg_loss + self.ppo.vf_coef * v_loss
        mean_ratio = pm.masked_mean(torch.exp(logprobs - old_logprobs), mask)
        bad = (~torch.isfinite(loss)) | (mean_ratio > self.ppo.ratio_threshold)
        if self._any_rank(bad):  # every rank skips together, or DDP would wait forever
            self.skipped_minibatches += 1
            return None
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        return {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy.detach(),
                "clipfrac": pg_clipfrac, "value_clipfrac": v_clipfrac, "approx_kl": approx_kl}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        started = time.perf_counter()
        self.model.eval()  # no dropout and no train-only behaviour, in rollout and update alike
        rollout = self.rollout(batch)
        scored = self.score(rollout)
        greedy = self.score_greedy(rollout)
        scores = normalize_scores(scored.rewards, self.ppo.samples_per_prompt, self.reward_spec.normalize,
                                  baseline=greedy.rewards if greedy is not None else None)
        self.evaluate(rollout)
        rewards = self.advantages(rollout, scores)
        stats = []
        G = rollout.prefix_ids.size(0)
        minibatch = max(G // self.ppo.num_minibatches, 1)  # groups per minibatch: a group's K samples stay together
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(G, device=self.device)
            for start in range(0, G, minibatch):
                result = self.update(rollout, order[start:start + minibatch])
                if result is not None:
                    stats.append(result)
        self.iteration += 1
        self._after_iteration(rollout, scored, greedy, rewards, stats, time.perf_counter() - started)

    # ------------------------------------------------------------------ bookkeeping
    def _any_rank(self, flag: torch.Tensor) -> bool:
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag.float(), reduce_op="sum")
        return bool(flag.item() > 0)

    def _gather_successes(self, successes: list[bool]) -> list[bool]:
        local = torch.tensor(successes, dtype=torch.float32, device=self.device)
        if self.trainer.world_size > 1:
            local = self.all_gather(local).reshape(-1)
        return [bool(s) for s in local.tolist()]

    def _after_iteration(self, rollout: Rollout, scored: ScoredAnswers, greedy: Optional[ScoredAnswers],
                         rewards: torch.Tensor, stats: list[dict], seconds: float) -> None:
        mask = rollout.response_mask.float()
        B = mask.size(0)
        kl_per_sequence = (pm.kl_estimate(rollout.logprobs, rollout.ref_logprobs, self.kl_spec.kind) * mask).sum(1).mean()
        if self.trainer.world_size > 1:
            kl_per_sequence = self.trainer.strategy.reduce(kl_per_sequence, reduce_op="mean")
        beta = self.kl_ctl.value
        self.kl_ctl.update(float(kl_per_sequence), B * self.trainer.world_size)
        level_before = self.curriculum.level
        self.curriculum.update(self._gather_successes(scored.successes), self.iteration)
        if self.curriculum.level != level_before:
            print(f"chemlit: curriculum level {level_before} -> {self.curriculum.level} "
                  f"(tolerance {self.curriculum.tolerance_c:g} °C) at iteration {self.iteration}")
        log = {
            "ppo/score_mean": scored.rewards.mean(), "ppo/score_std": scored.rewards.std(unbiased=False),
            "ppo/sample_mae": scored.mae,
            "ppo/parse_rate": scored.parse_rate, "ppo/success_rate": float(np.mean(scored.successes)),
            "ppo/kl_per_sequence": kl_per_sequence, "ppo/kl_coef": beta,
            "ppo/reward_total": (rewards * mask).sum(1).mean(),
            "ppo/explained_variance": pm.explained_variance(rollout.values, rollout.returns, mask),
            "ppo/response_length": mask.sum(1).mean(), "ppo/harshness_level": float(self.curriculum.level),
            "ppo/tolerance_c": self.curriculum.tolerance_c,
            "ppo/window_success_rate": self.curriculum.success_rate,
            "ppo/skipped_minibatches": float(self.skipped_minibatches),
            "ppo/samples_per_second": B / max(seconds, 1e-9),
        }
        if greedy is not None:  # what greedy decoding answers for this batch's molecules
            log["ppo/greedy_mae"] = greedy.mae
        for key in ("policy_loss", "value_loss", "entropy", "clipfrac", "value_clipfrac", "approx_kl"):
            if stats:
                log[f"ppo/{key}"] = torch.stack([s[key] for s in stats]).mean()
        for key, value in log.items():
            self.log(key, torch.as_tensor(value, dtype=torch.float32, device=self.device), sync_dist=True,
                     prog_bar=key in ("ppo/score_mean", "ppo/sample_mae", "ppo/tolerance_c"), batch_size=B)
        self._log_samples(rollout, scored)

    def _log_samples(self, rollout: Rollout, scored: ScoredAnswers) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text") or (self.iteration - 1) % max(self.trainer.log_every_n_steps, 1):
            return
        lines = [f"**{s}** (measured {t:g} °C, reward {r:+.2f})\n\n{text}" for s, t, r, text in
                 zip(rollout.smiles, rollout.targets, scored.rewards.tolist(), rollout.texts)][: self.log_examples]
        experiment.add_text("ppo/samples", "\n\n---\n\n".join(lines), self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_trained"):  # the prompt loader resumes exactly where training stopped
            loader.mark_trained(batch_idx + 1)

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
        checkpoint["chemlit_ppo"] = {
            "kl_controller": self.kl_ctl.state_dict(), "curriculum": self.curriculum.state_dict(),
            "skipped_minibatches": self.skipped_minibatches, "iteration": self.iteration,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                    "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
                    "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])},
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
        self._rng_to_restore = state["rng"]

    def on_train_start(self) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:  # restored here, after Lightning's own seeding, so the resumed run continues exactly
            torch.set_rng_state(torch.as_tensor(rng["torch"], dtype=torch.uint8))
            random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
            np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
            self._rng_to_restore = None

    # ------------------------------------------------------------------ validation / test: greedy, like SFT
    @torch.no_grad()
    def greedy_numbers(self, batch: dict) -> torch.Tensor:
        """Greedy answers' numbers (NaN where none parses): what validation and test score."""
        _, texts = self.write_answers(batch["prompt_ids"], batch["prompt_mask"], self.val_max_new_tokens)
        return self.as_tensor([parse_prediction(t) for t in texts])

    def on_validation_epoch_start(self) -> None:
        self._val_generated = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.val_generate_limit is not None and self._val_generated >= self.val_generate_limit:
            return
        values = self.greedy_numbers(batch)
        self._val_generated += values.numel()
        self.val_metrics.update(values, batch["targets"])

    def on_validation_epoch_end(self) -> None:
        for name, value in self.val_metrics.compute().items():
            self.log(f"val/{name}", value, prog_bar=name == "mae", sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        values = self.greedy_numbers(batch)
        self.test_metrics.update(values, batch["targets"])

    def on_test_epoch_end(self) -> None:
        for name, value in self.test_metrics.compute().items():
            self.log(f"test/{name}", value, sync_dist=True)
        self.test_metrics.reset()

    def export_info(self) -> dict:
        info = super().export_info()
        info["curriculum_history"] = self.curriculum.history
        return info


def sampling_kwargs(temperature: float) -> dict:
    """``generate`` arguments for plain sampling from softmax(logits / temperature).

    top_k and top_p are set to None explicitly: a model's generation_config may carry top_k=50 or
    top_p<1, which would silently truncate the distribution PPO's log-probs assume
    (tests/test_ppo_stage.py checks that the scores reaching the sampler have no -inf).
    """
    return {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None}
