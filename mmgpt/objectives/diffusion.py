"""Text-to-image training: LM loss on the reply + diffusion loss conditioned on the signal tokens.

For a :class:`~mmgpt.processor.MultimodalBatch` whose assistant turns contain ``"<image_out>"``
(expanded by the processor into ``[IMG0]..[IMGk-1]`` with labels on) and whose
``output_images`` are the targets (``(M, 3, H, W)`` in [-1, 1], the decoder's
``preprocess``):

1. one forward of the GPT over the whole batch (input images fused as usual);
2. the LM loss: cross-entropy of every labelled next token, signal tokens included, so the
   model learns *when* to draw;
3. the final hidden states at the signal spans ``(M, k, n_embd)`` → ``output_projector`` →
   condition ``(M, N, D)`` → ``image_decoder.training_loss`` (the decoder's own noise/v
   target and its condition dropout for classifier-free guidance);
4. ``loss = lm_weight · lm + diffusion_weight · diffusion`` (at ``diffusion_weight`` 0 the
   decoder is not run: a text stage's drawing prompts cost only their tokens).

Other output modalities work the same way: a sample's ``"<audio_out>"`` becomes the audio
decoder's signal tokens (labels on), the states at those spans (``batch.output_positions``)
go through ``output_projectors["audio"]``, and ``decoders["audio"].training_loss(condition,
targets)`` against ``batch.outputs["audio"]`` is added with its weight (``output_weights``,
default 1), so one run trains every decoder of the model.

``backprop_into_gpt=False`` detaches the hidden states: the image loss then trains only the
output projector and the decoder (GILL's frozen-LLM setting), while the LM loss still trains
the GPT. A batch without output images (caption or VQA samples of a mixed dataset) has a
diffusion loss of 0. The noise, timesteps and condition dropout come from torch's global
generator, which the trainer seeds and checkpoints.

A dataset without any drawing sample would train no drawing at all (a diffusion loss of 0 at
every step): :meth:`DiffusionObjective.check_data`, called by the recipe runner before
training, stops such a run with an error naming the data and what it needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmgpt.data.errors import DataError
from mmgpt.data.sample import count_drawing_samples, describe_dataset
from mmgpt.distributed import unwrap_model
from mmgpt.imagegen import gather_signal_states, require_image_generation
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.objectives.sft import check_reduction, sample_mean_cross_entropy
from mmgpt.processor import IGNORE_INDEX, MultimodalBatch
from mmgpt.registry import register

__all__ = ["DiffusionObjective"]


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"diffusion objective: {name} must be a number >= 0, got {value!r}")
    return float(value)


@register("objective", "diffusion")
class DiffusionObjective:
    """``lm_weight · LM + diffusion_weight · diffusion`` on a MultimodalBatch (module docstring).

    Args:
        lm_weight: weight of the next-token loss (0: not computed into the graph).
        diffusion_weight: weight of the decoder's loss.
        backprop_into_gpt: let the image loss train the GPT (and input encoders) too.
        output_weights: ``{modality: weight}`` of the other output modalities' decoder
            losses (default 1 each).
        learn_forced_tokens: also learn to predict ``[IMG1]..[IMGk-1]`` (default, every
            labelled token); ``False`` leaves them out of the LM loss, since generation forces
            them anyway, so the LM loss does not pull the signal states towards predicting the
            next signal token (only ``[IMG0]``, *when* to draw, and what follows are learned).
        lm_reduction: ``token`` (default): the LM loss is the mean over every labelled token
            of the batch; ``sample``: the mean over samples of each sample's mean, so that a
            one-word answer weighs as much as a caption (see :mod:`mmgpt.objectives.sft`).

    Metrics: ``lm_loss``, ``diffusion_loss``, ``images`` (output images per batch); for each
    other output modality ``m``: ``{m}_loss`` and ``{m}_outputs``.
    ``weight`` is the number of samples of the batch. :meth:`check_data` refuses a dataset
    without drawing samples before training.
    """

    def __init__(
        self,
        lm_weight: float = 1.0,
        diffusion_weight: float = 1.0,
        backprop_into_gpt: bool = True,
        learn_forced_tokens: bool = True,
        output_weights: dict[str, float] | None = None,
        lm_reduction: str = "token",
    ) -> None:
        self.lm_reduction = check_reduction("diffusion", lm_reduction)
        self.lm_weight = _weight("lm_weight", lm_weight)
        self.diffusion_weight = _weight("diffusion_weight", diffusion_weight)
        if not isinstance(backprop_into_gpt, bool):
            raise ValueError(
                f"diffusion objective: backprop_into_gpt must be true or false, got "
                f"{backprop_into_gpt!r}"
            )
        self.backprop_into_gpt = backprop_into_gpt
        if not isinstance(learn_forced_tokens, bool):
            raise ValueError(
                f"diffusion objective: learn_forced_tokens must be true or false, got "
                f"{learn_forced_tokens!r}"
            )
        self.learn_forced_tokens = learn_forced_tokens
        if output_weights is not None and not isinstance(output_weights, dict):
            raise ValueError(
                "diffusion objective: output_weights must map output modalities to weights, "
                f"got {output_weights!r}"
            )
        self.output_weights = {
            str(m): _weight(f"output_weights.{m}", w) for m, w in (output_weights or {}).items()
        }

    def check_data(self, dataset: Any) -> None:
        """Raise ``DataError`` when ``dataset`` holds no drawing sample (an assistant turn
        with ``"<image_out>"``), unless ``diffusion_weight`` is 0.

        File datasets are checked record by record without loading images; other map-style
        datasets by a probe of samples spread over them; iterable ones are not checked.
        """
        if self.diffusion_weight == 0:
            return
        found = count_drawing_samples(dataset, any_output=True)
        if found is None or found.drawing:
            return
        which = (
            f"none of its {found.checked} samples"
            if found.complete
            else f"none of {found.checked} samples spread over it"
        )
        source = describe_dataset(dataset)
        raise DataError(
            f"diffusion objective: no drawing samples in {source}: {which} asks the model to "
            "draw (an assistant turn holding an image), so the image decoder would never "
            "train. Give data.task=t2i (an imagefolder's captioned rows become drawing "
            "prompts; data.task=mixed keeps the captions too), or conversations whose "
            "assistant ('gpt') turn holds <image> (LLaVA JSON)",
            file=source,
            reason="no_drawing_samples",
        )

    def __call__(self, model: Any, batch: MultimodalBatch) -> ObjectiveOutput:
        if not isinstance(batch, MultimodalBatch):
            raise TypeError(
                "diffusion objective: expected a MultimodalBatch (collate the samples with "
                f"model.processor()), got {type(batch).__name__}"
            )
        if batch.labels is None:
            raise ValueError("diffusion objective: the batch has no labels")
        base = unwrap_model(model)
        others = dict(getattr(base, "decoders", None) or {})
        draws = base.image_decoder is not None or not others
        signal_ids = require_image_generation(base) if draws else []
        batch = batch.to(base.device)
        if not draws and batch.signal_positions.numel():
            raise ValueError(
                "diffusion objective: the batch has '<image_out>' spans but the model has no "
                f"image decoder (its output modalities: {sorted(others)})"
            )
        # at weight 0 the decoder is not run: its zero gradient would still cost a UNet
        # forward and backward for every drawing in the batch
        decodes = draws and self.diffusion_weight > 0
        targets = self._targets(base, batch) if decodes else None
        unknown = sorted(set(batch.output_positions) - set(others))
        if unknown:
            raise ValueError(f"diffusion objective: the model has no decoder for {unknown}")

        out = model(batch)  # logits (B, T, V), hidden_states (B, T, C)
        labels = batch.labels
        if not self.learn_forced_tokens and batch.signal_positions.numel():
            labels = labels.clone()
            rows, cols = batch.signal_positions[:, 0], batch.signal_positions[:, 1]
            for j in range(1, len(signal_ids)):  # [IMG1].. are forced at generation time
                labels[rows, cols + j] = IGNORE_INDEX
        if not self.learn_forced_tokens:
            for m, positions in batch.output_positions.items():
                labels = labels.clone()
                rows, cols = positions[:, 0], positions[:, 1]
                for j in range(1, len(base.output_signal_token_ids(m))):
                    labels[rows, cols + j] = IGNORE_INDEX
        if self.lm_reduction == "sample":
            lm, _ = sample_mean_cross_entropy(out.logits, labels)
        else:
            logits, shifted = out.logits[:, :-1], labels[:, 1:]
            lm = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            if not bool((shifted != IGNORE_INDEX).any()):
                lm = logits.sum() * 0.0  # no target token: cross_entropy's mean would be nan
        if self.lm_weight == 0:
            lm = lm.detach()  # reported, but no gradient path at all

        n_images = batch.signal_positions.size(0)
        if n_images and decodes:
            self._check_spans(batch, signal_ids, batch.signal_positions, "[IMG0]..[IMGk-1]")
            states = gather_signal_states(
                out.hidden_states, batch.signal_positions, len(signal_ids)
            )
            if not self.backprop_into_gpt:
                states = states.detach()
            condition = base.output_projector(states)  # (M, N, D)
            diffusion = base.image_decoder.training_loss(condition, targets)
        else:
            diffusion = torch.zeros((), device=lm.device)
        loss = self.lm_weight * lm + self.diffusion_weight * diffusion
        metrics = {
            "lm_loss": float(lm.detach()),
            "diffusion_loss": float(diffusion.detach()),
            "images": float(n_images),
        }
        for m, decoder in others.items():
            positions = batch.output_positions.get(m)
            n = 0 if positions is None else positions.size(0)
            if n:
                ids = base.output_signal_token_ids(m)
                self._check_spans(batch, ids, positions, f"<{m}_out>")
                states = gather_signal_states(out.hidden_states, positions, len(ids))
                if not self.backprop_into_gpt:
                    states = states.detach()
                condition = base.output_projectors[m](states)  # (M, N, D)
                part = decoder.training_loss(condition, self._output_targets(base, batch, m, n))
                loss = loss + self.output_weights.get(m, 1.0) * part
            else:
                part = torch.zeros((), device=lm.device)
            metrics[f"{m}_loss"] = float(part.detach())
            metrics[f"{m}_outputs"] = float(n)
        return ObjectiveOutput(loss=loss, metrics=metrics, weight=float(len(batch)))

    @staticmethod
    def _output_targets(model: Any, batch: MultimodalBatch, modality: str, n: int) -> Any:
        targets = batch.outputs.get(modality)
        if targets is None:
            raise ValueError(
                f"diffusion objective: the batch has {n} '<{modality}_out>' span(s) but no "
                f"{modality} outputs to learn them from"
            )
        if not isinstance(targets, torch.Tensor):  # items: the processor had no transform
            targets = model.decoders[modality].preprocess(list(targets))
        if targets.size(0) != n:
            raise ValueError(
                f"diffusion objective: {n} '<{modality}_out>' span(s) but {targets.size(0)} "
                f"{modality} output(s)"
            )
        return targets.to(model.device)

    @staticmethod
    def _targets(model: Any, batch: MultimodalBatch) -> torch.Tensor | None:
        n = batch.signal_positions.size(0)
        images = batch.output_images
        if n == 0:
            return None
        if images is None:
            raise ValueError(
                f"diffusion objective: the batch has {n} '<image_out>' span(s) but no output "
                "images to learn them from"
            )
        if not isinstance(images, torch.Tensor):  # PIL images: the processor had no transform
            images = model.image_decoder.preprocess(list(images))
        if images.size(0) != n:
            raise ValueError(
                f"diffusion objective: {n} signal span(s) but {images.size(0)} output image(s)"
            )
        return images.to(model.device)

    @staticmethod
    def _check_spans(
        batch: MultimodalBatch, signal_ids: list[int], positions: torch.Tensor, what: str
    ) -> None:
        k = len(signal_ids)
        ids = gather_signal_states(batch.input_ids[..., None], positions, k)[..., 0]
        expected = torch.tensor(signal_ids, device=ids.device)
        if not bool((ids == expected).all()):
            raise ValueError(
                f"diffusion objective: signal positions do not point at {what} spans of input_ids"
            )
