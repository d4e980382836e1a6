"""Contrastive image-text pretraining of an encoder (objective ``"contrastive"``: CLIP or SigLIP).

Two towers embed the two sides of each image-text pair of a batch into one space:

- **image**: the model's encoder for ``modality`` (any registered encoder: ``vit``, a plugin's)
  → mean over its tokens → ``image_head`` (a linear map to ``embed_dim``);
- **text**: the model's GPT over the caption's tokens and ``<eos>`` → the mean of its final
  hidden states (after ``ln_f``) over those tokens → ``text_head`` (linear, ``n_embd`` →
  ``embed_dim``). CLIP reads the ``<eos>`` state alone; both train here, and the mean needs
  no token to have learned to summarize the caption first.

Before each head the pooled features are standardized (:class:`Standardization`). What all
items share — an image's background, the tokens every caption has — dominates features that
are not yet trained, so the embeddings of a batch start nearly equal; without the
standardization our runs collapsed them to one point within a few steps (loss ``log B``).
The mean and variance are those of a *reference* batch under the current weights: in
training the previous training batch (the first batch its own), recomputed without gradient
before each step; in evaluation the last training batch, recomputed once after the weights
last changed; in a loaded directory the saved ones. An item's embedding therefore depends on
the item alone, and training and evaluation compute the same function. In training the
gradient is batch normalization's (batch renormalization, Ioffe 2017, with the reference's
statistics in place of moving averages), which keeps the loss from moving the whole batch
together; without it the towers learned far slower. The towers first used batch
normalization itself: its features generalized, but its moving averages lagged the fast-moving
features, so evaluation with them scored held-out pairs near chance while training pairs
scored 1.0.

The two embeddings are L2-normalized; the logits of the ``B × B`` pairs are ``scale · img @ txtᵀ`` (+ ``bias``
for SigLIP) with a learnable ``scale = exp(logit_scale)``:

- ``clip`` (Radford et al. 2021): the symmetric cross-entropy of each image against the
  batch's texts and each text against its images; the scale starts at 1/0.07 and is capped
  at 100, as in the paper;
- ``siglip`` (Zhai et al. 2023): every pair is a binary problem, ``−log σ(z_ij · logit_ij)``
  with ``z = +1`` on the diagonal and ``−1`` elsewhere, summed over pairs and divided by
  ``B``; the scale starts at 10 and the bias at −10, as in the paper.

Both losses are a few lines (:func:`clip_loss`, :func:`siglip_loss`), so they are written
here rather than imported: open_clip and big_vision bring their own towers, data pipelines and
heavy dependencies for these ten lines, and the towers here are mmgpt's own modules.

The negatives of a pair are the other pairs of its micro-batch: with ``grad_accum_steps > 1``
(or several processes) the step averages the micro-batches' losses, weighted by their pairs,
rather than contrasting all of them at once. The batch size is therefore the contrastive
batch size.

:meth:`ContrastiveObjective.build_trainer` is what ``mmgpt train clip`` runs: it wraps the
recipe's MultimodalGPT in a :class:`ContrastiveModel` and collates samples into
:class:`ContrastiveBatch` es (one image per sample; its caption is the text of the assistant's
turns). The saved model directory is the MultimodalGPT's, so ``model.from=DIR`` starts other
recipes from the pretrained encoder, plus the contrastive heads:

    contrastive_head.safetensors   the heads, the norms' statistics, logit_scale, logit_bias
    contrastive_config.json        {"architecture": "contrastive", "format_version": 1,
                                    "modality": "image", "embed_dim": 64, "loss": "clip"}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER, Sample
from mmgpt.head_directory import HeadDirectory
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.multimodal import MultimodalGPT
from mmgpt.registry import register
from mmgpt.rlhf.data import fields_to
from mmgpt.trainer import Trainer

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.trainer import TrainConfig

__all__ = [
    "LOSSES",
    "ContrastiveBatch",
    "ContrastiveCollator",
    "ContrastiveModel",
    "ContrastiveObjective",
    "ContrastiveOutput",
    "Standardization",
    "clip_loss",
    "siglip_loss",
]

LOSSES = ("clip", "siglip")
HEAD_NAME = "contrastive_head.safetensors"
CONFIG_NAME = "contrastive_config.json"
ARCHITECTURE = "contrastive"
FORMAT_VERSION = 1
MAX_LOGIT_SCALE = 100.0  # CLIP caps exp(logit_scale) here so training stays stable
# the papers' initial values: (log scale, bias)
INIT = {"clip": (math.log(1 / 0.07), 0.0), "siglip": (math.log(10.0), -10.0)}


# -- the losses -----------------------------------------------------------------------------
def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric cross-entropy; embeddings ``(B, D)`` L2-normalized, row i a pair.

    ``logit_scale`` is the multiplier itself (``exp`` of the learned parameter).
    """
    logits = logit_scale * image_embeds @ text_embeds.t()  # (B, B): image i vs text j
    targets = torch.arange(logits.size(0), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: ``−Σ_ij log σ(z_ij (scale · x_i·y_j + bias)) / B`` with
    ``z_ij = 1`` for ``i = j`` and ``−1`` otherwise."""
    logits = logit_scale * image_embeds @ text_embeds.t() + logit_bias  # (B, B)
    n = logits.size(0)
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1  # (B, B)
    return -F.logsigmoid(signs * logits).sum() / n


# -- batches ----------------------------------------------------------------------------------
@dataclass
class ContrastiveBatch:
    """``inputs`` (B, …): the encoder's preprocessed items; ``input_ids`` (B, T): each
    caption's tokens and ``<eos>``, right-padded; ``lengths`` (B,): tokens per caption."""

    inputs: Tensor
    input_ids: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.size(0))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ContrastiveBatch:
        """A copy with every tensor on ``device``."""
        return fields_to(self, device, non_blocking)


def sample_caption(sample: Sample) -> str:
    """The text side of a pair: the sample's assistant turns, joined by spaces."""
    texts = []
    for turn in sample.conversation:
        if turn.role == "assistant":
            text = turn.text.replace(IMAGE_OUT_PLACEHOLDER, "").replace(IMAGE_PLACEHOLDER, "")
            texts.append(text.strip())
    return " ".join(t for t in texts if t)


class ContrastiveCollator:
    """Samples (one item of ``modality`` each, a caption in the assistant's turns) → a
    :class:`ContrastiveBatch`; a caption longer than ``max_length`` tokens is an error unless
    ``truncation`` (then it is cut, keeping its ``<eos>``)."""

    def __init__(
        self,
        encoder: Any,
        tokenizer: Any,
        *,
        modality: str = "image",
        max_length: int,
        truncation: bool = False,
    ) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.modality = modality
        self.max_length = int(max_length)
        self.truncation = truncation

    def _item(self, sample: Sample, index: int) -> Any:
        items = sample.images if self.modality == "image" else sample.inputs.get(self.modality, [])
        if len(items) != 1:
            source = (sample.meta or {}).get("source", f"sample {index} of the batch")
            raise ValueError(
                f"contrastive objective: {source} has {len(items)} {self.modality} item(s); "
                "each image-text pair needs exactly one"
            )
        return items[0]

    def __call__(self, samples: Sequence[Sample]) -> ContrastiveBatch:
        items, ids = [], []
        for i, sample in enumerate(samples):
            items.append(self._item(sample, i))
            text = sample_caption(sample)
            if not text:
                source = (sample.meta or {}).get("source", f"sample {i} of the batch")
                raise ValueError(f"contrastive objective: {source} has no caption (assistant text)")
            tokens = self.tokenizer.encode(text, add_eos=True)
            if len(tokens) > self.max_length:
                if not self.truncation:
                    raise ValueError(
                        f"contrastive objective: a caption of {len(tokens)} tokens exceeds the "
                        f"model's context ({self.max_length}): {text[:80]!r}; set "
                        "data.truncation=true to cut it"
                    )
                tokens = tokens[: self.max_length - 1] + tokens[-1:]
            ids.append(tokens)
        T = max(len(t) for t in ids)
        pad = self.tokenizer.pad_id
        input_ids = torch.tensor([t + [pad] * (T - len(t)) for t in ids], dtype=torch.long)
        return ContrastiveBatch(
            inputs=self.encoder.preprocess(items),
            input_ids=input_ids,
            lengths=torch.tensor([len(t) for t in ids], dtype=torch.long),
        )


# -- the model --------------------------------------------------------------------------------
class Standardization(nn.Module):
    """Standardizes features ``(B, C)`` with a mean and variance it holds, in training as in
    evaluation: an item's output depends on the item alone.

    :meth:`set_statistics` sets them from the features of other items (the towers pass their
    reference batch's; see the module docstring). In training with gradients the value is the
    same, but the gradient is batch normalization's: batch renormalization (Ioffe 2017),
    ``(x − μ_B) / σ_B · r + d`` with ``r = σ_B / σ`` and ``d = (μ_B − μ) / σ`` held constant,
    unclipped so that the value stays exactly ``(x − μ) / σ``. The buffers keep batch
    normalization's names, so a directory saved when the towers used ``nn.BatchNorm1d`` loads
    and evaluates as it did. Written here because torch has no norm with held statistics and
    a batch's gradient.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:  # (B, C) → (B, C)
        if not (self.training and torch.is_grad_enabled() and x.size(0) >= 2):
            return F.batch_norm(
                x, self.running_mean, self.running_var, training=False, eps=self.eps
            )
        # batch renormalization, unclipped (class docstring): the gradient of a shift or scaling
        # shared by the whole batch is zero, as in batch normalization
        with torch.no_grad():
            mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)  # as F.batch_norm's
            held_std = (self.running_var + self.eps).sqrt()
            r, d = (var + self.eps).sqrt() / held_std, (mean - self.running_mean) / held_std
        return F.batch_norm(x, None, None, training=True, eps=self.eps) * r + d

    @torch.no_grad()
    def set_statistics(self, features: Tensor) -> None:
        """The mean and (unbiased) variance of ``features`` (N, C), N >= 2, without gradient."""
        if features.dim() != 2 or features.size(0) < 2:
            raise ValueError(
                "Standardization: statistics need features (N, C) with N >= 2, got shape "
                f"{tuple(features.shape)}"
            )
        features = features.detach().to(self.running_mean.dtype)
        self.running_mean.copy_(features.mean(dim=0))
        self.running_var.copy_(features.var(dim=0, unbiased=True))
        self.num_batches_tracked += 1


@dataclass
class ContrastiveOutput:
    image_embeds: Tensor  # (B, D), L2-normalized
    text_embeds: Tensor  # (B, D), L2-normalized
    logit_scale: Tensor  # () the multiplier exp(logit_scale), at most MAX_LOGIT_SCALE
    logit_bias: Tensor  # ()


class ContrastiveModel(HeadDirectory, nn.Module):
    """A MultimodalGPT ``backbone`` with the two towers' heads (see the module docstring).

    Args:
        backbone: its encoder for ``modality`` is the image tower, its GPT the text tower.
        modality: the encoder trained (``"image"``, or a plugin's modality).
        embed_dim: width of the shared embedding space.
        loss: ``"clip"`` or ``"siglip"``; sets the initial scale and bias (the papers').
    """

    head_file, config_file = HEAD_NAME, CONFIG_NAME
    architecture, kind, recipe = ARCHITECTURE, "contrastive model", "clip"

    def __init__(
        self,
        backbone: MultimodalGPT,
        *,
        modality: str = "image",
        embed_dim: int = 64,
        loss: str = "clip",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"contrastive loss must be one of {LOSSES}, got {loss!r}")
        if modality not in backbone.encoders:
            raise ValueError(
                f"contrastive objective: the model has no {modality!r} encoder "
                f"(it has: {', '.join(backbone.encoders) or 'none'})"
            )
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(
                f"contrastive objective: embed_dim must be an int >= 1, got {embed_dim!r}"
            )
        self.backbone = backbone
        self.modality = modality
        self.embed_dim = embed_dim
        self.loss = loss
        encoder = backbone.encoders[modality]
        d_enc, n_embd = int(encoder.output_dim), backbone.config.n_embd
        # pooled features standardized before each head, leak-free (module docstring)
        self.image_norm = Standardization(d_enc)
        self.text_norm = Standardization(n_embd)
        # no biases: the embeddings are normalized, a shift would only move them off-centre
        self.image_head = nn.Linear(d_enc, embed_dim, bias=False)
        self.text_head = nn.Linear(n_embd, embed_dim, bias=False)
        scale, bias = INIT[loss]
        self.logit_scale = nn.Parameter(torch.tensor(scale))
        self.logit_bias = nn.Parameter(torch.tensor(bias))
        # the batch whose features set the norms' statistics; not saved (see forward)
        self._reference: ContrastiveBatch | None = None
        self._statistics_stale = False
        self._freeze_unreached()

    def _freeze_unreached(self) -> None:
        """Turn gradients off for what the loss never reaches (the projectors, other encoders,
        the image decoder, an untied LM head; CLIP's unused bias), so that every trainable
        parameter gets a gradient each step (DDP expects that) and none is decayed for
        nothing. Parts frozen already stay frozen."""
        gpt = self.backbone.gpt
        reached = {id(p) for p in self.encoder.parameters()}
        reached |= {id(p) for p in gpt.transformer.parameters()}  # lm_head: only if tied to wte
        reached |= {id(p) for m in (self.image_head, self.text_head) for p in m.parameters()}
        reached.add(id(self.logit_scale))
        if self.loss == "siglip":
            reached.add(id(self.logit_bias))
        for p in self.parameters():
            if id(p) not in reached:
                p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoders[self.modality]

    @property
    def tied_weight_keys(self) -> list[str]:
        return [f"backbone.{k}" for k in getattr(self.backbone, "tied_weight_keys", [])]

    def collator(self, *, truncation: bool = False) -> ContrastiveCollator:
        return ContrastiveCollator(
            self.encoder,
            self.tokenizer,
            modality=self.modality,
            max_length=self.backbone.config.block_size,
            truncation=truncation,
        )

    def pool_inputs(self, inputs: Tensor) -> Tensor:
        """Preprocessed items → the mean of the encoder's tokens ``(B, d_enc)``, float32."""
        return self.encoder(inputs).mean(dim=1).float()  # (B, K, d_enc) → (B, d_enc)

    def pool_texts(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Right-padded caption ids ``(B, T)`` → the mean of the GPT's final states over each
        caption's tokens ``(B, n_embd)``, float32."""
        # no attention mask: the decoder is causal, so the states of the real tokens never
        # see the padding after them (and the fast causal path is taken)
        hidden = self.backbone.gpt(input_ids=input_ids, return_logits=False).hidden_states
        T = hidden.size(1)
        mask = torch.arange(T, device=hidden.device)[None] < lengths.to(hidden.device)[:, None]
        mask = mask.to(hidden.dtype)[..., None]  # (B, T, 1): the caption's tokens and <eos>
        return ((hidden * mask).sum(1) / mask.sum(1)).float()

    def embed_inputs(self, inputs: Tensor) -> Tensor:
        """Preprocessed items → normalized embeddings ``(B, embed_dim)``."""
        pooled = self.image_norm(self.pool_inputs(inputs))
        return F.normalize(self.image_head(pooled.to(self.image_head.weight.dtype)), dim=-1)

    def embed_texts(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Right-padded caption ids ``(B, T)`` → normalized embeddings ``(B, embed_dim)``."""
        pooled = self.text_norm(self.pool_texts(input_ids, lengths))
        return F.normalize(self.text_head(pooled.to(self.text_head.weight.dtype)), dim=-1)

    def _refresh_if_stale(self) -> None:
        """After optimizer steps, the statistics of the reference batch under the new weights."""
        if self._statistics_stale and self._reference is not None:
            self.refresh_statistics(self._reference)
            self._statistics_stale = False

    @torch.no_grad()
    def refresh_statistics(self, reference: ContrastiveBatch) -> None:
        """Set both norms' statistics to ``reference``'s pooled features under the current
        weights (no gradient)."""
        reference = reference.to(self.device)
        self.image_norm.set_statistics(self.pool_inputs(reference.inputs))
        self.text_norm.set_statistics(self.pool_texts(reference.input_ids, reference.lengths))

    def forward(self, batch: ContrastiveBatch) -> ContrastiveOutput:
        batch = batch.to(self.device)
        if self.training:
            # the previous training batch is the reference (the first batch its own), so
            # the statistics are the current weights' and never the batch's own
            self.refresh_statistics(batch if self._reference is None else self._reference)
            self._reference = batch
            self._statistics_stale = True  # an optimizer step follows
        else:
            self._refresh_if_stale()  # the weights the training left
        return ContrastiveOutput(
            image_embeds=self.embed_inputs(batch.inputs),
            text_embeds=self.embed_texts(batch.input_ids, batch.lengths),
            logit_scale=self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp(),
            logit_bias=self.logit_bias,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "architecture": ARCHITECTURE,
            "format_version": FORMAT_VERSION,
            "modality": self.modality,
            "embed_dim": self.embed_dim,
            "loss": self.loss,
        }

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The backbone's directory + ``contrastive_head.safetensors`` + its config, with the
        norms' statistics of the weights saved."""
        self._refresh_if_stale()
        super().save_pretrained(path)

    @classmethod
    def _from_config(cls, backbone: MultimodalGPT, config: Mapping[str, Any]) -> ContrastiveModel:
        return cls(
            backbone,
            modality=config["modality"],
            embed_dim=config["embed_dim"],
            loss=config["loss"],
        )


# -- the objective ------------------------------------------------------------------------------
@register("objective", "contrastive")
class ContrastiveObjective:
    """CLIP or SigLIP loss of a :class:`ContrastiveModel` on image-text pairs.

    Args:
        loss: ``"clip"`` (softmax, symmetric cross-entropy) or ``"siglip"`` (pairwise sigmoid).
        embed_dim: width of the shared embedding space (the heads' output).
        modality: the encoder trained.

    Metrics: ``loss``, ``image_to_text`` and ``text_to_image`` (top-1 retrieval accuracy
    within the batch: the share of images whose own caption scores highest, and the
    reverse), ``logit_scale``, ``pairs``; ``weight`` is the number of pairs.
    """

    def __init__(self, loss: str = "clip", embed_dim: int = 64, modality: str = "image") -> None:
        if loss not in LOSSES:
            raise ValueError(f"contrastive objective: loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.embed_dim = embed_dim
        self.modality = modality

    def __call__(self, model: Any, batch: ContrastiveBatch) -> ObjectiveOutput:
        if not isinstance(batch, ContrastiveBatch):
            raise TypeError(
                f"contrastive objective: expected a ContrastiveBatch (collate with "
                f"ContrastiveModel.collator()), got {type(batch).__name__}"
            )
        if len(batch) < 2:
            if not model.training:
                # an evaluation's last, partial batch (or a rank's padding batch) of one pair
                # has no negatives: it counts for nothing rather than stopping the run
                device = next(model.parameters()).device
                return ObjectiveOutput(loss=torch.zeros((), device=device), metrics={}, weight=0.0)
            raise ValueError(
                "contrastive objective: a training batch needs at least 2 pairs (the other pairs "
                f"are each pair's negatives), got {len(batch)}; raise train.batch_size"
            )
        out = model(batch)
        img, txt = out.image_embeds.float(), out.text_embeds.float()
        if self.loss == "clip":
            loss = clip_loss(img, txt, out.logit_scale)
        else:
            loss = siglip_loss(img, txt, out.logit_scale, out.logit_bias)
        with torch.no_grad():
            sims = img @ txt.t()  # (B, B)
            targets = torch.arange(sims.size(0), device=sims.device)
            i2t = (sims.argmax(dim=1) == targets).float().mean()
            t2i = (sims.argmax(dim=0) == targets).float().mean()
        n = len(batch)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "image_to_text": float(i2t),
                "text_to_image": float(t2i),
                "logit_scale": float(out.logit_scale.detach()),
                "pairs": float(n),
            },
            weight=float(n),
        )

    def wrap(self, model: MultimodalGPT | ContrastiveModel) -> ContrastiveModel:
        """``model`` itself when it is a ContrastiveModel, else the towers' heads around it."""
        if isinstance(model, ContrastiveModel):
            return model
        if not isinstance(model, MultimodalGPT):
            raise TypeError(
                "contrastive objective: expected a MultimodalGPT (model.architecture: "
                f"multimodal) or a ContrastiveModel, got {type(model).__name__}"
            )
        return ContrastiveModel(
            model, modality=self.modality, embed_dim=self.embed_dim, loss=self.loss
        )

    def build_trainer(
        self,
        model: MultimodalGPT | ContrastiveModel,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> Trainer:
        """A Trainer for the contrastive towers around ``model``."""
        wrapped = self.wrap(model)
        return Trainer(
            wrapped,
            self,
            train_data,
            config,
            eval_data=eval_data,
            collate_fn=wrapped.collator(truncation=truncation),
            out_dir=out_dir,
        )
