"""Reward modelling (objective ``"reward"``): Bradley-Terry on preference pairs with images.

``model`` is a :class:`~mmgpt.rlhf.reward_model.RewardModel` (a MultimodalGPT backbone whose
image encoder sees the pair's image, + a scalar head on the last non-pad token); ``batch`` a
:class:`~mmgpt.rlhf.data.PreferenceBatch`. The loss is ``−log σ(r(x, y_w) − r(x, y_l))``
averaged over the pairs; ``accuracy`` (the fraction of pairs ranked right) is the held-out
metric. RLHF libraries score text-only models; mmgpt's reward model reads images, so the
objective is computed here on its own scores.

:meth:`RewardObjective.build_trainer` is what ``mmgpt train reward`` runs: it wraps the
starting model in a RewardModel, collates pairs with its processor, and when the model is saved
records the mean and std of its scores over the training answers (for PPO's normalisation).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mmgpt.interfaces import ObjectiveOutput
from mmgpt.registry import register
from mmgpt.rlhf.data import PreferenceBatch, PreferenceCollator
from mmgpt.rlhf.losses import bradley_terry_loss
from mmgpt.rlhf.reward_model import RewardModel, reward_statistics
from mmgpt.trainer import Trainer

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.trainer import TrainConfig

__all__ = ["RewardObjective"]


@register("objective", "reward")
class RewardObjective:
    """Bradley-Terry loss of a reward model on preference pairs.

    Args:
        margin: subtracted from ``r_chosen − r_rejected`` inside the sigmoid (Llama 2's margin
            loss; 0 = the plain Bradley-Terry loss).
        likelihood_weight: start value of the learned weight of the answer's log-likelihood
            under the backbone, added to the head's score (see :mod:`mmgpt.rlhf.reward_model`;
            ``None``: the head alone). A reward model started from a captioner ranks its
            own captions with it from the first step.

    Metrics: ``loss``, ``accuracy``, ``margin`` (mean score gap), ``reward_chosen``,
    ``reward_rejected``, ``pairs``; ``weight`` is the number of pairs.
    """

    def __init__(self, margin: float = 0.0, likelihood_weight: float | None = None) -> None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"reward objective: margin must be a number, got {margin!r}")
        w = likelihood_weight
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))):
            raise ValueError(
                f"reward objective: likelihood_weight must be a number or null, got {w!r}"
            )
        self.margin = float(margin)
        self.likelihood_weight = None if w is None else float(w)

    def __call__(self, model: Any, batch: PreferenceBatch) -> ObjectiveOutput:
        if not isinstance(batch, PreferenceBatch):
            raise TypeError(
                f"reward objective: expected a PreferenceBatch (collate pairs with "
                f"PreferenceCollator), got {type(batch).__name__}"
            )
        scores = model(batch.pairs)  # (2B,)
        B = len(batch)
        chosen, rejected = scores[:B], scores[B:]
        margin = None
        if self.margin:
            margin = chosen.new_full(chosen.shape, self.margin)
        loss = bradley_terry_loss(chosen, rejected, margin)
        gap = (chosen - rejected).detach()
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "accuracy": float((gap > 0).float().mean()),
                "margin": float(gap.mean()),
                "reward_chosen": float(chosen.detach().mean()),
                "reward_rejected": float(rejected.detach().mean()),
                "pairs": float(B),
            },
            weight=float(B),
        )

    def build_trainer(
        self,
        model: MultimodalGPT | RewardModel,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> Trainer:
        """A Trainer for a reward model started from ``model`` (a MultimodalGPT or RewardModel)."""
        if isinstance(model, RewardModel):
            reward_model = model
        else:
            reward_model = RewardModel(model, likelihood_weight=self.likelihood_weight)
        collate = PreferenceCollator(reward_model.processor(truncation=truncation))

        def save(m: RewardModel, directory: Any) -> None:
            m.normalization = reward_statistics(m, train_data, collate)
            m.save_pretrained(directory)

        return Trainer(
            reward_model,
            self,
            train_data,
            config,
            eval_data=eval_data,
            collate_fn=collate,
            out_dir=out_dir,
            save_model_fn=save,
        )
