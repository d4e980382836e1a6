"""PPO's actor side: sampling answers to image+text prompts and scoring them token by token.

A rollout row is ``[left-padded prompt | answer tokens, right-padded]``: the prompt batch comes
from the policy's processor (images fused into their slots by ``MultimodalGPT.embed``), the
answer from the KV-cache generator (:func:`mmgpt.generation.generate`) and ends with ``<eos>``
when the policy stopped. Log-probabilities are recomputed with one forward pass over
``embed(prompt) ⧺ token_embeddings(answer)`` — the answer tokens are embedded exactly as the
generator fed them, so even a sampled ``<image>`` id stays a plain token.

``logits[:, t]`` predicts token ``t + 1``, so with the prompt in columns ``0..P-1`` the answer
token ``j`` is scored by the logits of column ``P - 1 + j``; the value of "about to emit
token ``j``" is read from the same column's hidden state.

mmgpt computes these itself rather than through an RLHF library: those assume a text-only
causal LM, and this policy reads images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from mmgpt.data.sample import Sample
from mmgpt.generation import GenerationConfig, generate
from mmgpt.processor import IGNORE_INDEX, MultimodalBatch
from mmgpt.rlhf.data import fields_to, select_rows
from mmgpt.rlhf.losses import entropy_from_logits, token_logprobs

__all__ = [
    "PolicyWithValueHead",
    "ResponseBatch",
    "ResponseScores",
    "generate_responses",
    "response_forward",
]


@dataclass
class ResponseBatch:
    """Prompts and sampled answers, plus what PPO attaches to them (all ``(B, R)`` unless
    noted; ``R`` = the longest answer; ``response_mask`` is 1 on answer tokens)."""

    prompt: MultimodalBatch  # left-padded prompts with their images
    response_ids: Tensor  # (B, R) long, pad after the answer
    response_mask: Tensor  # (B, R) float
    old_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def __len__(self) -> int:
        return self.response_ids.size(0)

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ResponseBatch:
        return fields_to(self, device, non_blocking)

    def select(self, rows: Sequence[int] | Tensor) -> ResponseBatch:
        """The rows ``rows`` (a PPO minibatch), each with its own images."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "prompt":
                value = select_rows(value, rows)
            elif value is not None:
                value = value[rows.to(value.device)]
            picked[f.name] = value
        return ResponseBatch(**picked)


@dataclass
class ResponseScores:
    """Per-token outputs of :func:`response_forward`: ``(B, R)`` each (0 off the answer)."""

    logprobs: Tensor
    entropy: Tensor | None
    hidden_states: Tensor | None  # (B, R, C): the states that predict each answer token


def response_forward(
    model: nn.Module,
    batch: ResponseBatch,
    *,
    with_entropy: bool = False,
    with_hidden: bool = False,
    temperature: float = 1.0,
) -> ResponseScores:
    """log π(answer token | prompt, images, earlier tokens) for a MultimodalGPT ``model``.

    ``temperature``: score under ``softmax(logits / temperature)``, the distribution that
    :func:`generate_responses` sampled from with that temperature.
    """
    device = model.device
    prompt = batch.prompt.to(device)
    response_ids = batch.response_ids.to(device)
    response_mask = batch.response_mask.to(device)
    P, R = prompt.input_ids.size(1), response_ids.size(1)
    prompt_embeds = model.embed(prompt)  # (B, P, C)
    answer_embeds = model.gpt.get_input_embeddings()(response_ids)  # (B, R, C)
    inputs = torch.cat([prompt_embeds, answer_embeds.to(prompt_embeds.dtype)], dim=1)
    mask = torch.cat([prompt.attention_mask, response_mask.long()], dim=1)  # (B, P + R)
    out = model.gpt(inputs_embeds=inputs, attention_mask=mask, logits_to_keep=R + 1)
    logits = out.logits[:, :-1]  # (B, R, V): column P-1+j predicts answer token j
    if temperature != 1.0:
        logits = logits / temperature
    labels = response_ids.masked_fill(response_mask == 0, IGNORE_INDEX)
    logprobs = token_logprobs(logits, labels)  # (B, R), 0 off the answer
    entropy = entropy_from_logits(logits) * response_mask if with_entropy else None
    hidden = out.hidden_states[:, P - 1 : P + R - 1] if with_hidden else None  # (B, R, C)
    return ResponseScores(logprobs, entropy, hidden)


class PolicyWithValueHead(nn.Module):
    """The PPO actor-critic: the policy and a scalar value head on its final hidden states.

    The head is a separate small ``Linear(n_embd, 1)``; the trunk is shared (the value loss
    also trains the policy's layers, as in Ziegler et al. / TRL). While ``deterministic``,
    the policy stays in eval mode even under ``.train()``: the ratio π/π_old must compare the
    same function that produced the rollout, so dropout stays off. ``temperature`` is the
    sampling temperature of the rollouts: log-probabilities are those of the tempered
    distribution the answers were drawn from.
    """

    def __init__(
        self,
        policy: nn.Module,
        value_head: nn.Linear | None = None,
        *,
        deterministic: bool = True,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.policy = policy
        n_embd = policy.config.n_embd
        if value_head is None:
            value_head = nn.Linear(n_embd, 1)
            nn.init.zeros_(value_head.weight)  # values start at 0: no arbitrary early baseline
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head
        self.deterministic = deterministic
        self.temperature = temperature

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def tied_weight_keys(self) -> list[str]:
        return [f"policy.{k}" for k in getattr(self.policy, "tied_weight_keys", [])]

    def train(self, mode: bool = True) -> PolicyWithValueHead:
        super().train(mode)
        if self.deterministic:
            self.policy.eval()
        return self

    def forward(self, batch: ResponseBatch, *, with_entropy: bool = True) -> tuple[Tensor, ...]:
        """``(logprobs, values, entropy)`` of the answer tokens, each ``(B, R)``."""
        scores = response_forward(
            self.policy,
            batch,
            with_entropy=with_entropy,
            with_hidden=True,
            temperature=self.temperature,
        )
        hidden = scores.hidden_states
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, R)
        mask = batch.response_mask.to(values.device)
        return scores.logprobs, values * mask, scores.entropy


@torch.no_grad()
def generate_responses(
    policy: nn.Module, prompts: Sequence[Sample], config: GenerationConfig
) -> tuple[ResponseBatch, list[str], list[bool]]:
    """Sample an answer to each prompt with the KV-cache generator.

    Returns the batch (answers end with ``<eos>`` when the policy stopped), the answers as
    text (special tokens dropped, the chat separator stripped) and whether each one ended
    with ``<eos>`` (False: cut at ``max_new_tokens``).
    """
    tokenizer = policy.tokenizer
    eos = int(tokenizer.eos_id)
    if eos not in config.stop_token_ids:
        config = replace(config, stop_token_ids=(*config.stop_token_ids, eos))
    prompt = policy.processor().prompt_batch(
        [p.conversation for p in prompts],
        [p.images for p in prompts],
        [getattr(p, "inputs", None) or None for p in prompts],
    )
    prompt = prompt.to(policy.device)
    was_training = policy.training
    policy.eval()
    try:
        embeds = policy.embed(prompt)  # (B, P, C)
        out = generate(
            policy.gpt,
            None,
            config,
            pad_id=int(tokenizer.pad_id),
            inputs_embeds=embeds,
            attention_mask=prompt.attention_mask,
            return_dict=True,
        )
    finally:
        policy.train(was_training)
    ended = [reason == "stop" for reason in out.finish_reasons]
    answers = [[*toks, eos] if stop else list(toks) for toks, stop in zip(out.tokens, ended)]
    R = max(len(a) for a in answers)
    ids = torch.full((len(answers), R), int(tokenizer.pad_id), dtype=torch.long)
    mask = torch.zeros(len(answers), R)
    for row, answer in enumerate(answers):
        ids[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[row, : len(answer)] = 1.0
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
    prompt.labels = None
    return ResponseBatch(prompt.to("cpu"), ids, mask), texts, ended
