"""Reward model: a MultimodalGPT backbone (image encoder included) + a scalar head.

The score of a (prompt, images, answer) sequence is ``head(h_last)``, where ``h_last`` is the
final hidden state (after ``ln_f``) of the LAST NON-PAD token: the decoder is causal, so only
that position has read the whole prompt, image and answer. Trained with the Bradley-Terry loss
``−log σ(r(x, y_w) − r(x, y_l))`` (objective ``"reward"``).

With ``likelihood_weight`` the score adds ``w · log p(answer | prompt, images)``, the answer's
log-likelihood under the backbone's own language-model head (``w`` is learned with the rest).
A backbone fine-tuned from a captioner already *knows* whether a caption fits the image — that
is what its next-token predictions are — but a fresh head on the last token has to learn to
read that agreement back out of one hidden state, attribute by attribute, and in a few hundred
steps it does not: such a head can stay at chance on colour pairs that the captioner's
likelihood orders every time. The likelihood term hands the head that knowledge from step 0.

An answer may itself be an image: an ``"<image>"`` placeholder in the assistant turn puts the
image encoder's features of that (generated) image there, so the same model scores image
outputs (:class:`~mmgpt.rlhf.data.ImageOutputPair`, :meth:`RewardModel.score`).

A saved reward model is a MultimodalGPT directory (``config.json``, ``model.safetensors``,
tokenizer files: the backbone loads with ``MultimodalGPT.from_pretrained``) plus::

    reward_head.safetensors   the head's weight (1, C) and bias (1,) [and likelihood_weight ()]
    reward_config.json        {"architecture": "reward", "format_version": 1,
                               "normalization": {"mean": m, "std": s, "count": n} | null,
                               "likelihood": true | false}

``normalization`` holds the mean and standard deviation of the model's scores over its
training answers (chosen and rejected), so PPO can use ``(r − mean) / std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmgpt.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from mmgpt.files import load_tensors
from mmgpt.head_directory import read_head_config, write_head_directory
from mmgpt.multimodal import MultimodalGPT
from mmgpt.processor import MultimodalBatch
from mmgpt.rlhf.losses import sequence_logprobs

__all__ = ["REWARD_CONFIG", "REWARD_HEAD", "RewardModel", "last_token_index", "reward_statistics"]

REWARD_HEAD = "reward_head.safetensors"
REWARD_CONFIG = "reward_config.json"
ARCHITECTURE = "reward"
FORMAT_VERSION = 1


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (mask 1), for right or left padding: ``(B,)``."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, time), got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("a row of the batch has no token (its attention_mask is all 0)")
    T = mask.size(1)
    # first 1 from the right, counted from the left
    return T - 1 - mask.flip(-1).long().argmax(-1)


class RewardModel(nn.Module):
    """``backbone`` (a :class:`~mmgpt.multimodal.MultimodalGPT`) + a linear scalar head.

    ``model(batch)`` returns the scores ``(B,)``; :meth:`score` takes conversations, images
    and answers as text (the reward model tokenizes them itself, so a policy with another
    tokenizer can be scored).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        head: nn.Linear | None = None,
        likelihood_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        n_embd = backbone.config.n_embd
        if head is None:
            head = nn.Linear(n_embd, 1)
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(n_embd + 1))
            nn.init.zeros_(head.bias)
        if (head.in_features, head.out_features) != (n_embd, 1):
            raise ValueError(
                f"reward head maps {head.in_features} → {head.out_features}; expected "
                f"{n_embd} → 1 (the backbone's width)"
            )
        self.head = head
        # w of the log-likelihood term (None: the head alone; see the module docstring)
        self.likelihood_weight: nn.Parameter | None = None
        if likelihood_weight is not None:
            w = likelihood_weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"likelihood_weight: expected a number or None, got {w!r}")
            self.likelihood_weight = nn.Parameter(torch.tensor(float(w)))
        self.normalization: dict[str, float] | None = None

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def tied_weight_keys(self) -> list[str]:
        return [f"backbone.{k}" for k in getattr(self.backbone, "tied_weight_keys", [])]

    def processor(self, **kwargs: Any) -> Any:
        """The backbone's processor (right padding)."""
        return self.backbone.processor(**kwargs)

    def forward(self, batch: MultimodalBatch) -> Tensor:
        """Scores ``(B,)`` from the hidden state of each row's last non-pad token (plus the
        weighted log-likelihood of the answer, the tokens ``batch.labels`` marks)."""
        batch = batch.to(self.device)
        likelihood = self.likelihood_weight is not None
        if likelihood and batch.labels is None:
            raise ValueError(
                "reward model with a likelihood term: the batch has no labels marking the "
                "answer tokens (collate with the model's processor)"
            )
        out = self.backbone(batch, return_logits=likelihood)
        hidden = out.hidden_states  # (B, T, C)
        last = last_token_index(batch.attention_mask)  # (B,)
        h = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, C)
        scores = self.head(h.to(self.head.weight.dtype)).squeeze(-1)  # (B,)
        if likelihood:
            logp = sequence_logprobs(out.logits, batch.labels)  # (B,) Σ log p(answer token)
            scores = scores + self.likelihood_weight * logp.to(scores.dtype)
        return scores

    def normalize(self, scores: Tensor) -> Tensor:
        """``(scores − mean) / std`` with the training-set statistics (identity without them)."""
        if not self.normalization:
            return scores
        return (scores - self.normalization["mean"]) / max(self.normalization["std"], 1e-6)

    @torch.no_grad()
    def score(
        self,
        conversations: Sequence[Sequence[Turn]],
        answers: Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        answer_images: Sequence[Sequence[Any]] | None = None,
        normalize: bool = False,
        batch_size: int = 64,
    ) -> Tensor:
        """Scores of ``answers`` to prompts (conversations ending with a user turn): ``(N,)``.

        ``answer_images[i]``: images the answer shows (generated images); each needs an
        ``"<image>"`` in ``answers[i]`` — an answer that is only images can be ``""``, then it
        becomes one placeholder per image. Sequences longer than the backbone's context are
        cut at the end.
        """
        n = len(answers)
        if len(conversations) != n:
            raise ValueError(f"score: {len(conversations)} conversations but {n} answers")
        images = images if images is not None else [[] for _ in range(n)]
        answer_images = answer_images if answer_images is not None else [[] for _ in range(n)]
        if len(images) != n or len(answer_images) != n:
            raise ValueError("score: images and answer_images need one list per answer")
        samples = []
        for conv, answer, ims, outs in zip(conversations, answers, images, answer_images):
            if outs and not answer:
                answer = IMAGE_PLACEHOLDER * len(outs)
            turns = [*conv, Turn("assistant", answer)]
            samples.append(Sample(turns, [*ims, *outs]))
        processor = self.processor(truncation=True)
        was_training = self.training
        self.eval()
        try:
            scores = torch.cat(
                [self(processor(samples[i : i + batch_size])) for i in range(0, n, batch_size)]
            )
        finally:
            self.train(was_training)
        return self.normalize(scores) if normalize else scores

    # -- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """The backbone's directory + ``reward_head.safetensors`` + ``reward_config.json``."""
        tensors = {"weight": self.head.weight, "bias": self.head.bias}
        if self.likelihood_weight is not None:
            tensors["likelihood_weight"] = self.likelihood_weight
        config = {
            "architecture": ARCHITECTURE,
            "format_version": FORMAT_VERSION,
            "normalization": self.normalization,
            "likelihood": self.likelihood_weight is not None,
        }
        write_head_directory(
            self.backbone, path, tensors, config, head_name=REWARD_HEAD, config_name=REWARD_CONFIG
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, map_location: str | torch.device = "cpu"
    ) -> RewardModel:
        """Load a directory written by :meth:`save_pretrained`."""
        path = Path(path)
        config = read_head_config(
            path,
            config_name=REWARD_CONFIG,
            architecture=ARCHITECTURE,
            what="reward model",
            recipe="reward",
        )
        backbone = MultimodalGPT.from_pretrained(path, map_location=map_location)
        state = load_tensors(path / REWARD_HEAD, map_location)
        n_embd = backbone.config.n_embd
        weight, bias = state.get("weight"), state.get("bias")
        if weight is None or bias is None or tuple(weight.shape) != (1, n_embd):
            raise ValueError(
                f"{path / REWARD_HEAD}: expected 'weight' (1, {n_embd}) and 'bias' (1,), got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        head = nn.Linear(n_embd, 1).to(map_location)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        w = state.get("likelihood_weight")
        if bool(config.get("likelihood", False)) != (w is not None):
            raise ValueError(
                f"{path}: {REWARD_CONFIG} says likelihood={config.get('likelihood', False)} but "
                f"{REWARD_HEAD} {'has no' if w is None else 'has a'} 'likelihood_weight'"
            )
        model = cls(backbone, head=head, likelihood_weight=None if w is None else float(w))
        norm = config.get("normalization")
        if norm is not None:
            if not isinstance(norm, dict) or not {"mean", "std"} <= set(norm):
                raise ValueError(f"{path / REWARD_CONFIG}: 'normalization' needs 'mean' and 'std'")
            model.normalization = {k: float(v) for k, v in norm.items()}
        return model


@torch.no_grad()
def reward_statistics(
    model: RewardModel,
    dataset: Any,
    collate_fn: Any,
    *,
    batch_size: int = 32,
    max_pairs: int | None = 8192,
) -> dict[str, float]:
    """Mean and std of the scores of the answers (chosen and rejected) of ``dataset``.

    ``max_pairs``: at most that many pairs, evenly spread over the dataset (``None``: all).
    Ranked lists expand into many pairs per prompt (50 and more); two moments need far fewer,
    and scoring them all would cost as much as the training did.
    """
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"reward_statistics: max_pairs must be >= 1 or None, got {max_pairs}")
    n = len(dataset)
    indices = list(range(n))
    if max_pairs is not None and n > max_pairs:
        indices = [i * n // max_pairs for i in range(max_pairs)]
    was_training = model.training
    model.eval()
    total = total_sq = 0.0
    count = 0
    try:
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            scores = model(collate_fn(items).pairs).double()
            total += float(scores.sum())
            total_sq += float((scores**2).sum())
            count += scores.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("reward_statistics: the dataset is empty")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    return {"mean": mean, "std": std, "count": float(count)}
