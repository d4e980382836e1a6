"""Direct preference optimisation (objective ``"dpo"``; ``loss_type: ipo`` for IPO).

The policy (a :class:`~mmgpt.multimodal.MultimodalGPT`, images in the prompt) is trained
directly on preference pairs:

    sigmoid:  −log σ(β [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])
    ipo:      ((log-ratio gap) − 1/(2β))²   on length-averaged log-probabilities

The frozen reference's log-probabilities never change, so they are computed ONCE before
training and cached per pair, in memory and in the run directory
(:mod:`mmgpt.rlhf.reference`); the batches this objective receives carry them
(``PreferenceBatch.reference_logps``) and it runs with the standard
:class:`~mmgpt.trainer.Trainer`. A batch without cached values is accepted only for a LoRA
policy, whose reference is the same model with its adapters disabled.

TRL's DPOTrainer expects a text-only causal LM; mmgpt's policies read images, so DPO is computed
here on the policy's own log-probabilities.

Metrics: ``reward_accuracy`` (pairs whose implicit reward β·log(π/π_ref) ranks the chosen
answer first), ``reward_margin``, ``reward_chosen``, ``reward_rejected``, ``logps_chosen``,
``logps_rejected``, ``pairs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmgpt.adapters.directory import has_adapters
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.processor import IGNORE_INDEX
from mmgpt.registry import register
from mmgpt.rlhf.data import PreferenceBatch, PreferenceCollator
from mmgpt.rlhf.losses import dpo_loss
from mmgpt.rlhf.policy import ReferencePolicy, save_policy, sequence_logps
from mmgpt.rlhf.reference import (
    WithReferenceLogps,
    cached_reference_logps,
    compute_reference_logps,
)
from mmgpt.trainer import TrainConfig, Trainer

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.multimodal import MultimodalGPT

__all__ = ["REFERENCE_LOGPS", "DPOObjective"]

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_LOGPS = "reference_logps.safetensors"  # in the run directory; eval pairs: *_eval


@register("objective", "dpo")
class DPOObjective:
    """DPO/IPO loss on preference pairs with cached reference log-probabilities.

    Args:
        beta: strength of the implicit KL constraint (higher: stay closer to the reference).
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        label_smoothing: conservative DPO's assumed label-noise rate (sigmoid only).
        average_logps: use per-token average log-probabilities (default: only for IPO, as
            its authors do); the cache holds sums, the token counts come from the batch.
        sft_weight: adds ``sft_weight`` × the chosen answers' per-token negative
            log-likelihood (RPO, Pang et al. 2024): keeps DPO from lowering the likelihood of
            the chosen answers along with the rejected ones.
        reference_batch_size: pairs per forward pass when precomputing the reference.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        average_logps: bool | None = None,
        sft_weight: float = 0.0,
        reference_batch_size: int = 16,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(
                f"dpo objective: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}"
            )
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"dpo objective: beta must be a number > 0, got {beta!r}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(
                f"dpo objective: label_smoothing must be in [0, 0.5), got {label_smoothing!r}"
            )
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("dpo objective: label_smoothing applies to loss_type='sigmoid' only")
        if (
            isinstance(sft_weight, bool)
            or not isinstance(sft_weight, (int, float))
            or sft_weight < 0
        ):
            raise ValueError(f"dpo objective: sft_weight must be a number >= 0, got {sft_weight!r}")
        if not isinstance(reference_batch_size, int) or reference_batch_size < 1:
            raise ValueError(
                "dpo objective: reference_batch_size must be a positive integer, got "
                f"{reference_batch_size!r}"
            )
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.average_logps = loss_type == "ipo" if average_logps is None else bool(average_logps)
        self.sft_weight = float(sft_weight)
        self.reference_batch_size = reference_batch_size

    def __call__(self, model: Any, batch: PreferenceBatch) -> ObjectiveOutput:
        if not isinstance(batch, PreferenceBatch):
            raise TypeError(
                f"dpo objective: expected a PreferenceBatch (collate pairs with "
                f"PreferenceCollator), got {type(batch).__name__}"
            )
        B = len(batch)
        logps = sequence_logps(model, batch.pairs)  # (2B,) chosen rows, then rejected
        reference = batch.reference_logps
        if reference is None:
            reference = self._reference_now(model, batch)
        reference = reference.to(logps.device)  # (B, 2)
        ref = torch.cat([reference[:, 0], reference[:, 1]])  # (2B,) in the rows' order
        labels = batch.pairs.labels.to(logps.device)
        n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)  # (2B,)
        nll_chosen = -(logps[:B] / n_tokens[:B]).mean()  # per-token NLL of the chosen answers
        if self.average_logps:
            logps, ref = logps / n_tokens, ref / n_tokens
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:B],
            logps[B:],
            ref[:B],
            ref[B:],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        if self.sft_weight:
            loss = loss + self.sft_weight * nll_chosen
        margin = chosen_rewards - rejected_rewards
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "reward_accuracy": float((margin > 0).float().mean()),
                "reward_margin": float(margin.mean()),
                "reward_chosen": float(chosen_rewards.mean()),
                "reward_rejected": float(rejected_rewards.mean()),
                "logps_chosen": float(logps[:B].detach().mean()),
                "logps_rejected": float(logps[B:].detach().mean()),
                "nll_chosen": float(nll_chosen.detach()),
                "pairs": float(B),
            },
            weight=float(B),
        )

    @staticmethod
    def _reference_now(model: Any, batch: PreferenceBatch) -> torch.Tensor:
        core = getattr(model, "module", model)
        if not has_adapters(core):
            raise ValueError(
                "dpo objective: the batch carries no reference log-probabilities; precompute "
                "them (DPOObjective.prepare_data / `mmgpt train dpo`), or train LoRA adapters "
                "so the reference is the model with its adapters disabled"
            )
        with ReferencePolicy(core).active() as reference:
            logps = sequence_logps(reference, batch.pairs)
        B = len(batch)
        return torch.stack([logps[:B], logps[B:]], dim=1)

    # -- the run: reference log-probs once, then the standard Trainer -----------------------
    def prepare_data(
        self,
        model: Any,
        datasets: dict[str, Any],
        collate_fn: Any,
        *,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Attach the reference's log-probabilities to each dataset (``{"train": …}``).

        ``model`` must still hold the reference weights (the starting policy). With
        ``cache_dir`` they are read from / written to ``reference_logps[_<split>].safetensors``
        there, so a resumed run does not recompute them.
        """
        reference = ReferencePolicy(model, copy=False)  # nothing has changed the policy yet
        out = {}
        for split, dataset in datasets.items():
            if dataset is None:
                out[split] = None
                continue
            kwargs = {"batch_size": self.reference_batch_size, "progress": progress}
            if cache_dir is not None:
                name = (
                    REFERENCE_LOGPS if split == "train" else f"reference_logps_{split}.safetensors"
                )
                logps = cached_reference_logps(
                    reference, dataset, collate_fn, Path(cache_dir) / name, **kwargs
                )
            else:
                logps = compute_reference_logps(reference, dataset, collate_fn, **kwargs)
            out[split] = WithReferenceLogps(dataset, logps)
        return out

    def build_trainer(
        self,
        model: MultimodalGPT,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> Trainer:
        """A Trainer for DPO from ``model`` (which is also the reference), reference
        log-probabilities cached in ``out_dir``."""
        config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        collate = PreferenceCollator(model.processor(truncation=truncation))
        data = self.prepare_data(
            model,
            {"train": train_data, "eval": eval_data},
            collate,
            cache_dir=out_dir,
            progress=config.progress,
        )
        return Trainer(
            model,
            self,
            data["train"],
            config,
            eval_data=data["eval"],
            collate_fn=collate,
            out_dir=out_dir,
            save_model_fn=save_policy,
        )
