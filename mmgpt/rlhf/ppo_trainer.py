"""PPOTrainer: RLHF of a multimodal policy against a reward model, with KL control.

One trainer *step* is one PPO iteration:

1. **Rollout** — take ``train.batch_size × train.grad_accum_steps`` prompts (text + images),
   sample an answer to each with the KV-cache generator, score prompt + answer with the
   reward model (the reward model sees the image too), and recompute per answer token the
   policy's log-probabilities, its values (value head) and the frozen reference's
   log-probabilities — both of the distribution sampled from (logits / ``temperature``).
2. **Rewards** — per token ``r_t = −β (log π − log π_ref)``; the last answer token also gets the
   reward model's score (normalised with its training statistics). β follows Ziegler et al.'s
   adaptive controller toward ``target_kl`` (nats per answer).
3. **Advantages** — GAE over the answer tokens, then whitened over the batch.
4. **Optimisation** — ``ppo_epochs`` passes over the rollout in shuffled minibatches, one
   optimizer step each, with the clipped policy and value losses (objective ``"ppo"``).

It is a :class:`~mmgpt.trainer.Trainer` whose ``train_step`` is the above: optimizer (AdamW with
decay groups), learning-rate schedule (one scheduler step per rollout), gradient clipping,
autocast, the prompt loader's resumable position, ``metrics.jsonl``, TensorBoard, the progress
bar, evaluation cadence and atomic checkpoints all come from the Trainer. A checkpoint holds the
policy and value head (one model state), the optimizer, the RNG states, the step and the data
position, plus the KL controller (the Trainer's ``extra`` state).

The reference policy: with LoRA adapters on the policy, the same module with its adapters
disabled (no second copy of the weights); otherwise a frozen deep copy of the starting policy.

Guards against reward hacking (:mod:`mmgpt.rlhf.guards`, settings of the objective): scores
whitened over the rollout (``whiten_rewards``) and clipped (``reward_clip``), penalties for
answers cut off (``missing_eos_penalty``) or rejected by ``format_fn`` (``format_penalty``), a
hard KL stop (``kl_stop``), early stopping on a held-out metric that keeps the best policy
(``early_stop_metric``, ``early_stop_patience``, ``restore_best``) and a detector that warns —
in ``metrics.jsonl`` (``hacking_warning``, ``hacking_reasons``), on stderr and in the progress
bar — when the held-out reward rises while held-out quality or the reference's
log-likelihood of the answers (``ref_logp``) falls. When any of the evaluation guards is on,
the starting policy is evaluated before the first rollout (an ``eval`` record at step 0).

mmgpt implements PPO itself: RLHF libraries such as TRL assume a text-only causal LM, while
this policy reads images through MultimodalGPT.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mmgpt.data.sample import Sample
from mmgpt.generation import GenerationConfig
from mmgpt.rlhf.data import collate_prompts
from mmgpt.rlhf.guards import EarlyStopping, RewardHackingDetector
from mmgpt.rlhf.losses import AdaptiveKLController, gae, masked_mean, masked_whiten
from mmgpt.rlhf.policy import ReferencePolicy, save_policy
from mmgpt.rlhf.ppo import PPOConfig, PPOLoss
from mmgpt.rlhf.reward_model import RewardModel
from mmgpt.rlhf.rollout import (
    PolicyWithValueHead,
    ResponseBatch,
    generate_responses,
    response_forward,
)
from mmgpt.trainer import TrainConfig, Trainer

__all__ = ["EvalFn", "FormatFn", "PPOTrainer"]

# eval_fn(prompts, answers) -> extra metrics (e.g. caption exact match) for evaluate()
EvalFn = Callable[[Sequence[Sample], Sequence[str]], dict[str, float]]
# format_fn(prompt, answer) -> whether the answer is well-formed (format_penalty otherwise)
FormatFn = Callable[[Sample, str], bool]


class PPOTrainer(Trainer):
    """PPO on ``policy`` (a MultimodalGPT, optionally with LoRA) against ``reward_model``.

    Args:
        policy: the model to improve (usually an SFT model); saved to ``out_dir/model``.
        reward_model: a :class:`~mmgpt.rlhf.reward_model.RewardModel` (frozen here).
        prompts: a map-style dataset of prompts: Samples (their final answer is dropped),
            preference pairs (their prompt) or strings; see :func:`~mmgpt.rlhf.data.as_prompt`.
        config: :class:`~mmgpt.trainer.TrainConfig`; ``max_steps`` counts rollouts,
            ``batch_size × grad_accum_steps`` prompts make one.
        objective: the ``"ppo"`` objective (a :class:`~mmgpt.rlhf.ppo.PPOLoss`), a
            :class:`~mmgpt.rlhf.ppo.PPOConfig` or a dict of its fields.
        eval_prompts: held-out prompts; ``evaluate`` answers them greedily and reports the mean
            reward (and ``eval_fn``'s metrics).
        value_head: a trained ``Linear(n_embd, 1)`` to start from (default: zeros).
        eval_fn: ``(prompts, answers) -> metrics`` added to each evaluation; its
            ``quality_metric`` key (default ``exact_match`` when present) is the held-out
            quality the hacking detector watches.
        format_fn: ``(prompt, answer) -> bool``; answers it rejects lose ``format_penalty``.
    """

    quality_metric = "exact_match"

    def __init__(
        self,
        policy: nn.Module,
        reward_model: RewardModel,
        prompts: Any,
        config: TrainConfig | dict[str, Any],
        objective: PPOLoss | PPOConfig | dict[str, Any] | None = None,
        *,
        eval_prompts: Any = None,
        out_dir: str | os.PathLike,
        value_head: nn.Linear | None = None,
        eval_fn: EvalFn | None = None,
        format_fn: FormatFn | None = None,
    ) -> None:
        if isinstance(objective, PPOConfig):
            objective = PPOLoss(**objective.to_dict())
        elif objective is None or isinstance(objective, dict):
            objective = PPOLoss(**(objective or {}))
        if not isinstance(objective, PPOLoss):
            raise TypeError(f"objective: expected the ppo objective, got {objective!r}")
        self.ppo: PPOConfig = objective.config
        # the reference is taken from the starting weights, before any step (or resume) changes them
        self.reference = ReferencePolicy(policy)
        super().__init__(
            # log-probabilities of the tempered distribution the rollouts sample from
            PolicyWithValueHead(policy, value_head, temperature=self.ppo.temperature),
            objective,
            prompts,
            config,
            eval_data=eval_prompts,
            collate_fn=collate_prompts,
            out_dir=out_dir,
            save_model_fn=save_policy,
        )
        self.policy = policy
        self.reference.to(self.device)
        self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        self.kl_controller = AdaptiveKLController(
            self.ppo.init_kl_coef, self.ppo.target_kl, self.ppo.kl_horizon
        )
        self.eval_fn = eval_fn
        self._init_guards(format_fn)

    def _init_guards(self, format_fn: FormatFn | None) -> None:
        """The reward-hacking guards' state (shared with the group trainers)."""
        cfg = self.ppo
        self.format_fn = format_fn
        if cfg.format_penalty and format_fn is None:
            raise ValueError(
                "format_penalty is set but the trainer has no format_fn to check answers with"
            )
        self.hacking_detector = RewardHackingDetector(cfg.hack_quality_drop, cfg.hack_ref_logp_drop)
        self.early_stopping = (
            EarlyStopping(cfg.early_stop_metric, cfg.early_stop_patience)
            if cfg.early_stop_metric is not None
            else None
        )
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_early: str | None = None  # why the run stopped before max_steps
        self._bar: Any = None

    # -- checkpoints: the KL controller and the guards ride along in the trainer state -------
    def _extra_state(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_controller.state_dict(), **self._guard_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        self._load_guard_state(state)

    def _guard_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"hacking_detector": self.hacking_detector.state_dict()}
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping.state_dict()
        return state

    def _load_guard_state(self, state: dict[str, Any]) -> None:
        # the best policy's weights are not in the checkpoint: after a resume, restore_best
        # keeps the best policy evaluated since
        if "hacking_detector" in state:
            self.hacking_detector.load_state_dict(state["hacking_detector"])
        if self.early_stopping is not None and "early_stopping" in state:
            self.early_stopping.load_state_dict(state["early_stopping"])

    # -- one PPO iteration ---------------------------------------------------------------
    def generation_config(self, *, greedy: bool = False) -> GenerationConfig:
        cfg = self.ppo
        if greedy:
            return GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False)
        return GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
        )

    def score(self, prompts: Sequence[Sample], answers: Sequence[str]) -> torch.Tensor:
        """The reward model's scores of ``answers`` (raw, not normalised): ``(B,)``."""
        return self.reward_model.score(
            [p.conversation for p in prompts], answers, [p.images for p in prompts]
        ).to(self.device)

    def shaped_scores(
        self, prompts: Sequence[Sample], answers: Sequence[str], ended: Sequence[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(raw, shaped, stats)``: the reward model's scores of ``answers`` and the scores
        trained on — normalised with the reward model's statistics, whitened over the rollout
        (``whiten_rewards``), clipped, minus the unfinished-answer and format penalties."""
        cfg = self.ppo
        raw = self.score(prompts, answers)  # (B,)
        scores = self.reward_model.normalize(raw) if cfg.normalize_reward else raw
        if getattr(cfg, "whiten_rewards", False) and len(scores) > 1:
            scores = (scores - scores.mean()) / (scores.std() + 1e-6)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        unfinished = ~torch.tensor(list(ended), device=self.device)
        scores = scores - cfg.missing_eos_penalty * unfinished.float()
        stats: dict[str, float] = {}
        if self.format_fn is not None:
            bad = torch.tensor(
                [not self.format_fn(p, a) for p, a in zip(prompts, answers)], device=self.device
            )
            scores = scores - cfg.format_penalty * bad.float()
            stats["format_violations"] = float(bad.float().mean())
        return raw, scores, stats

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sample]) -> tuple[ResponseBatch, dict[str, float]]:
        """Sample, score and annotate a batch of answers (steps 1–3 of the module docstring)."""
        cfg = self.ppo
        batch, answers, ended = generate_responses(self.policy, prompts, self.generation_config())
        batch = batch.to(self.device)
        raw, scores, guard_stats = self.shaped_scores(prompts, answers, ended)

        self.wrapped_model.eval()
        logprobs, values, _ = self.wrapped_model(batch, with_entropy=False)  # (B, R) each
        with self.reference.active() as reference:
            ref_logprobs = response_forward(
                reference, batch, temperature=cfg.temperature
            ).logprobs  # (B, R)
        mask = batch.response_mask
        kl = (logprobs - ref_logprobs) * mask  # (B, R) per-token log-ratio
        beta = self.kl_controller.beta
        rewards = -beta * kl
        last = (batch.lengths.long() - 1).clamp(min=0)  # (B,) last answer token
        rows = torch.arange(len(batch), device=self.device)
        rewards[rows, last] += scores
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        batch.old_logprobs, batch.old_values = logprobs, values
        batch.advantages, batch.returns = advantages, returns
        sequence_kl = kl.sum(-1)  # (B,) log π(y) − log π_ref(y): a sample of KL(π ‖ π_ref)
        stats = {
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "score": float(scores.mean()),
            "kl": float(sequence_kl.mean()),
            "non_score_reward": float((-beta * kl).sum(-1).mean()),
            "beta": beta,
            "response_length": float(batch.lengths.mean()),
            "ended_with_eos": float(torch.tensor(ended, dtype=torch.float).mean()),
            "value_mean": float(masked_mean(values, mask)),
            # the reference's per-token log-likelihood of the sampled answers
            "ref_logp": float(masked_mean(ref_logprobs, mask)),
            **guard_stats,
        }
        return batch, stats

    def train_step(self, micro_batches: Sequence[Any]) -> dict[str, float]:
        """A rollout, then ``update_epochs`` of minibatch updates; one scheduler step."""
        cfg = self.ppo
        self._baseline_evaluation()
        k = cfg.samples_per_prompt
        prompts = [p for micro in micro_batches for p in micro for _ in range(k)]
        batch, stats = self.rollout(prompts)
        stopping = self._kl_stop(stats)
        epochs = self.update_epochs
        means = {} if stopping else self.update_on(batch, epochs, cfg.minibatch_size)
        self._after_update(batch, stats, 0 if stopping else epochs)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        return {"loss": float("nan"), **means, **stats, "lr": lr}

    @property
    def update_epochs(self) -> int:
        """Passes over each rollout."""
        return self.ppo.ppo_epochs

    def _after_update(self, batch: Any, stats: dict[str, float], epochs: int) -> None:
        """Throughput and the adaptive KL coefficient, once per rollout."""
        self.tokens_seen += float(batch.response_mask.sum()) * epochs
        self.kl_controller.update(stats["kl"], len(batch))

    # -- guards -------------------------------------------------------------------------
    def _guards_evaluate(self) -> bool:
        cfg = self.ppo
        return self.eval_loader is not None and (
            self.early_stopping is not None
            or cfg.hack_quality_drop > 0
            or cfg.hack_ref_logp_drop > 0
        )

    def _baseline_evaluation(self) -> None:
        """Evaluate the starting policy before the first rollout: the reference point of the
        hacking detector and of early stopping (the run may never beat the start)."""
        if self.step != 0 or not self._guards_evaluate():
            return
        self.last_eval = self.evaluate()
        self._log({"step": 0, "split": "eval", **self.last_eval})

    def _kl_stop(self, stats: dict[str, float]) -> bool:
        """The hard KL stop: True (and the run ends after this step) when the rollout's KL to
        the reference exceeds ``kl_stop``; the rollout is then not trained on."""
        limit = self.ppo.kl_stop
        if limit is None or not stats["kl"] > limit:
            stats["kl_stop"] = 0.0
            return False
        stats["kl_stop"] = 1.0
        self._stop(f"KL {stats['kl']:.2f} > kl_stop {limit} nats per answer")
        return True

    def _stop(self, reason: str) -> None:
        """End the run after the current step: ``max_steps`` becomes the step being finished
        (the Trainer's loop then saves the checkpoint and the model as at the end)."""
        if self.stopped_early is not None:
            return
        self.stopped_early = reason
        self.config.max_steps = self.step + (0 if self._in_evaluation else 1)
        print(f"stopping at step {self.config.max_steps}: {reason}", file=sys.stderr, flush=True)

    _in_evaluation = False

    def _watch(self, metrics: dict[str, Any]) -> None:
        """The hacking detector and early stopping on one evaluation's ``metrics``."""
        quality = metrics.get(self.quality_metric)
        reasons = self.hacking_detector.update(
            self.step, metrics["reward"], quality, metrics.get("ref_logp")
        )
        metrics["hacking_warning"] = float(bool(reasons))
        if reasons:
            metrics["hacking_reasons"] = "; ".join(reasons)
            print(
                f"step {self.step}: possible reward hacking: {metrics['hacking_reasons']}",
                file=sys.stderr,
                flush=True,
            )
        if self._bar is not None:
            flagged = self.hacking_detector.warnings
            self._bar.set_description(f"train [reward hacking? {flagged}x]" if flagged else "train")
        if self.early_stopping is not None:
            if self.early_stopping.update(self.step, metrics) and self.ppo.restore_best:
                self.best_state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in self.wrapped_model.state_dict().items()
                }
            metrics["best_" + self.early_stopping.metric] = self.early_stopping.best
            metrics["best_step"] = self.early_stopping.best_step
            if self.early_stopping.should_stop and self.step > 0:
                self._stop(
                    f"{self.early_stopping.metric} has not improved for "
                    f"{self.early_stopping.patience} evaluations (best "
                    f"{self.early_stopping.best:.4f} at step {self.early_stopping.best_step})"
                )

    def _progress_bar(self) -> Any:
        self._bar = super()._progress_bar()
        return self._bar

    def save_model(self, directory: str | os.PathLike | None = None) -> Any:
        """Save the policy; with early stopping and ``restore_best``, the best-evaluated one."""
        if self.best_state is not None:
            self.wrapped_model.load_state_dict(self.best_state)
            if self.is_main_process and self.metrics_path.is_file():
                # the Trainer has closed its log by now: one more record, appended
                record = {
                    "step": self.step,
                    "split": "eval",
                    "restored_best_step": self.early_stopping.best_step,
                    "stopped_early": self.stopped_early,
                }
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        return super().save_model(directory)

    def update_on(self, batch: Any, epochs: int, minibatch_size: int) -> dict[str, float]:
        """``epochs`` passes of optimizer steps over shuffled minibatches of one rollout
        ``batch``; returns the metrics averaged over the steps."""
        n = len(batch)
        size = min(minibatch_size, n)
        sums: dict[str, float] = defaultdict(float)
        updates = 0
        for _ in range(epochs):
            order = torch.randperm(n)
            for start in range(0, n, size):
                minibatch = batch.select(order[start : start + size])
                metrics = self.compute_gradients([minibatch])
                metrics["grad_norm"] = self.clip_gradients()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in metrics.items():
                    sums[key] += value
                updates += 1
        return {key: value / updates for key, value in sums.items()}

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Greedy answers to the held-out prompts: mean reward, length, ``eval_fn``'s metrics."""
        if self.eval_loader is None:
            return {}
        max_batches = self.config.eval_batches if max_batches is None else max_batches
        prompts: list[Sample] = []
        for i, micro in enumerate(self.eval_loader.iter_epoch(0)):
            if max_batches and i >= max_batches:
                break
            prompts += micro
        if not prompts:
            return {}
        batch, answers, _ = generate_responses(
            self.policy, prompts, self.generation_config(greedy=True)
        )
        raw = self.score(prompts, answers)
        with self.reference.active() as reference:
            ref_logprobs = response_forward(reference, batch.to(self.device)).logprobs
        metrics: dict[str, Any] = {
            "reward": float(raw.mean()),
            "response_length": float(batch.lengths.float().mean()),
            # how plausible the starting policy finds the answers (nats per token): falls
            # sharply when the policy drifts to text the reward model was never shown
            "ref_logp": float(masked_mean(ref_logprobs, batch.response_mask.to(self.device))),
        }
        if self.eval_fn is not None:
            metrics.update(self.eval_fn(prompts, answers))
        self._in_evaluation = True
        try:
            self._watch(metrics)
        finally:
            self._in_evaluation = False
        return metrics
