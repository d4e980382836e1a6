"""Shared pieces of the side-by-side benchmarks: fair timing, the benchmark model, tables.

Fairness rules every script follows: the contenders run the same weights (ours exported with
``save_hf_gpt2``, or ``save_hf`` for the Llama family, and loaded by transformers), alternate
inside one process (A B A B …, the
order flipped every round so neither always runs on a warmer cache), warm up first, and report
the median of the repeats. Nothing here is a test; these are scripts to be read by a human.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmgpt.config import GPTConfig
from mmgpt.model import GPT
from mmgpt.pretrained import save_hf, save_hf_gpt2

# The model the targets are stated for: 6 layers, 384 wide, 6 heads, 256 context, vocab 512,
# learned positions and the tanh GELU, i.e. exactly what GPT-2 computes.
BENCH_CONFIG = dict(
    n_layer=6,
    n_head=6,
    n_embd=384,
    block_size=256,
    vocab_size=512,
    pos_encoding="learned",
    norm="layernorm",
    activation="gelu_tanh",
    dropout=0.0,
    tie_embeddings=True,
)


# The Llama-family benchmark model (``--family llama``): as deep and wide as the GPT-2 one,
# with grouped-query attention (6 query heads share 3 key/value heads), SwiGLU (intermediate
# 1024 = 8/3 · 384), RMSNorm, rotary positions, no biases, an untied LM head and an 8k
# vocabulary (16.0M parameters; the two 8192×384 tables are 6.3M of them).
LLAMA_BENCH_CONFIG = dict(
    n_layer=6,
    n_head=6,
    n_kv_head=3,
    n_embd=384,
    intermediate_size=1024,
    block_size=256,
    vocab_size=8192,
    pos_encoding="rotary",
    rope_theta=10000.0,
    norm="rmsnorm",
    norm_eps=1e-5,
    activation="silu",
    gated_mlp=True,
    bias=False,
    dropout=0.0,
    tie_embeddings=False,
)

BENCH_CONFIGS = {"gpt2": BENCH_CONFIG, "llama": LLAMA_BENCH_CONFIG}
FAMILIES = tuple(BENCH_CONFIGS)


def bench_config(family: str = "gpt2", **overrides) -> GPTConfig:
    """The benchmark model of ``family``; a Llama model given another ``n_embd`` keeps its
    MLP at 8/3 of the width unless ``intermediate_size`` is given too."""
    base = BENCH_CONFIGS[family]
    if "intermediate_size" in base and "n_embd" in overrides:
        overrides.setdefault("intermediate_size", overrides["n_embd"] * 8 // 3)
    return GPTConfig(**{**base, **overrides})


def add_family_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="gpt2",
        help="benchmark model: gpt2 (vs GPT2LMHeadModel) or llama (GQA, SwiGLU, RMSNorm, "
        "RoPE, untied head; vs LlamaForCausalLM)",
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per contender")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (needs a quiet machine); cpu: this process's CPU time, which "
        "other processes cannot inflate; meaningful with --threads 1 (idle OpenMP threads spin)",
    )


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


# transformers' names for GPT-2's tanh GELU: "gelu_new" is what GPT2Config defaults to and what
# the released GPT-2 checkpoints say (composed of elementwise ops in Python);
# "gelu_pytorch_tanh" calls the same fused kernel as mmgpt. Same function, different cost.
HF_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def hf_contenders(family: str, hf_activations: Sequence[str] | None) -> list[str]:
    """The transformers contenders of ``family``, by the label of their rows: GPT-2 has one
    per name of its tanh GELU (default: both); Llama has one (SiLU has a single name)."""
    if family == "gpt2":
        return list(hf_activations or HF_TANH_GELUS)
    if hf_activations:
        raise SystemExit("--hf-activation names GPT-2's GELU; it does not apply to --family llama")
    return ["LlamaForCausalLM"]


def ours_and_hf(
    config: GPTConfig,
    seed: int = 0,
    hf_attn: str = "sdpa",
    hf_activations: Sequence[str] = ("gelu_new",),
    family: str = "gpt2",
) -> tuple[GPT, dict[str, torch.nn.Module]]:
    """Our GPT and transformers' model with identical weights: for GPT-2, one
    GPT2LMHeadModel per activation name; for Llama, {"LlamaForCausalLM": model}."""
    torch.manual_seed(seed)
    ours = GPT(config)
    if family == "llama":
        return ours, {"LlamaForCausalLM": _hf_llama(ours, hf_attn)}
    from transformers import GPT2LMHeadModel

    theirs = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_gpt2(ours, tmp)
        config_path = Path(tmp) / "config.json"
        hf_config = json.loads(config_path.read_text())
        for act in hf_activations:
            if config.activation == "gelu_tanh" and act not in HF_TANH_GELUS:
                raise ValueError(f"{act!r} is not the tanh GELU the model uses")
            config_path.write_text(json.dumps({**hf_config, "activation_function": act}))
            theirs[act] = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation=hf_attn).float()
    return ours, theirs


def _hf_llama(ours: GPT, hf_attn: str) -> torch.nn.Module:
    """transformers' LlamaForCausalLM loading the directory ``save_hf`` writes for ``ours``."""
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        family = save_hf(ours, tmp)
        if family != "llama":
            raise ValueError(f"the benchmark model exports as {family!r}, not llama")
        return LlamaForCausalLM.from_pretrained(tmp, attn_implementation=hf_attn).float()


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how noisy the machine was."""
        return (max(self.seconds) - min(self.seconds)) / self.median


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternate(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, interleaved; flip the order every round."""
    now = CLOCKS[clock]
    names = list(contenders)
    timings = {n: Timing(n) for n in names}
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            gc.collect()
            start = now()
            contenders[n]()
            timings[n].seconds.append(now() - start)
    return timings


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(clock: str = "wall") -> str:
    import transformers

    return (
        f"{cpu_model_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{clock} clock, load average {os.getloadavg()[0]:.2f}"
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def matmul_flops_per_s(
    m: int, k: int | None = None, n: int | None = None, repeats: int = 5, clock: str = "wall"
) -> float:
    """Median FLOP/s of an fp32 (m × k) @ (k × n) matmul; square when only ``m`` is given."""
    k, n = k or m, n or m
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm up: MKL picks its kernels, pages get touched
    inner = max(1, int(2e9 // (2 * m * k * n)))  # small shapes: several calls per timing
    now = CLOCKS[clock]
    times = []
    for _ in range(repeats):
        start = now()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        times.append((now() - start) / inner)
    return 2 * m * k * n / statistics.median(times)


def training_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (PaLM appendix B / nanoGPT's estimate_mfu):
    6·N for the weight matmuls (forward 2N + backward 4N) plus 12·L·C·T for attention
    scores and weighted values. N excludes the position table and the input embedding
    (lookups, not matmuls) and counts the LM head once (tied or not). With grouped-query
    attention, k and v have n_kv_head · head_dim outputs; a gated MLP has three matrices."""
    c = config
    kv_dim = c.kv_heads * c.head_dim
    attn = c.n_embd * (c.n_embd + 2 * kv_dim) + c.n_embd * c.n_embd
    mlp = (3 if c.gated_mlp else 2) * c.n_embd * c.mlp_hidden
    n_matmul = c.n_layer * (attn + mlp) + c.vocab_size * c.n_embd
    return 6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len


# --------------------------------------------------------------------------------------
# Floors: the work no implementation of the same model can skip
# --------------------------------------------------------------------------------------


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight matrix of every matmul of a forward pass, in order (LM head last)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def decode_floor(model: GPT, batch: int, new_tokens: int) -> Callable[[], None]:
    """The decode steps' weight matmuls alone: every step streams all weights once."""
    weights = linear_weights(model)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    @torch.inference_mode()
    def run() -> None:
        for _ in range(new_tokens):
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    return run


def training_floor(model: GPT, batch: int, context: int) -> Callable[[], None]:
    """One training step's weight matmuls (forward, input grad, weight grad) and attention
    (forward + backward, causal; grouped-query as the model has it), with nothing in
    between."""
    c = model.config
    tokens = batch * context
    gemms = []
    for w in linear_weights(model):
        out_f, in_f = w.shape
        x, gy = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
        gemms.append(
            (
                x,
                w,
                gy,
                torch.empty(tokens, out_f),
                torch.empty(tokens, in_f),
                torch.empty(out_f, in_f),
            )
        )
    q = torch.randn(batch, c.n_head, context, c.head_dim, requires_grad=True)
    k, v = (
        torch.randn(batch, c.kv_heads, context, c.head_dim, requires_grad=True) for _ in range(2)
    )
    grad = torch.randn(q.shape)
    gqa = c.kv_heads != c.n_head

    def run() -> None:
        for x, w, gy, y, gx, gw in gemms:
            torch.mm(x, w.t(), out=y)  # forward
            torch.mm(gy, w, out=gx)  # grad wrt the input
            torch.mm(gy.t(), x, out=gw)  # grad wrt the weight
        for _ in range(c.n_layer):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            out.backward(grad)

    return run


# --------------------------------------------------------------------------------------
# A briefly trained benchmark model (for speculative decoding: a random model's greedy
# continuation repeats one token, which any draft predicts, so acceptance would mean nothing)
# --------------------------------------------------------------------------------------


def shapes_text(n_captions: int, seed: int) -> bytes:
    """Captions of random shapes-world scenes, ". "-separated, as UTF-8 bytes (token = byte).
    Template words are predictable, the shapes' attributes are not (uniformly random)."""
    import random

    from mmgpt.data.shapes import COLORS, KINDS, POSITIONS, SIZES, Shape, caption

    rng = random.Random(seed)
    captions = []
    for _ in range(n_captions):
        cells = rng.sample(POSITIONS, rng.randint(1, 3))
        scene = [
            Shape(rng.choice(KINDS), rng.choice(list(COLORS)), rng.choice(SIZES), cell)
            for cell in cells
        ]
        captions.append(caption(scene))
    return (". ".join(captions) + ". ").encode()


def train_briefly(
    model: nn.Module,
    data: torch.Tensor,  # (N,) token ids
    steps: int,
    *,
    batch: int = 8,
    context: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """AdamW on random windows of ``data`` (linear warmup over 10% of the steps, then
    constant); returns the losses. The model is left in eval mode."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=g)
        windows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def held_out_loss(model: nn.Module, data: torch.Tensor, context: int = 256) -> float:
    """Mean next-token cross-entropy over consecutive windows of ``data``."""
    n = (data.numel() - 1) // context
    x = data[: n * context].view(n, context)
    y = data[1 : n * context + 1].view(n, context)
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()


def hf_twins(
    ours: GPT, hf_activations: Sequence[str], family: str = "gpt2"
) -> dict[str, nn.Module]:
    """transformers' models with the weights of ``ours`` (as :func:`ours_and_hf` builds them)."""
    if family == "llama":
        return {"LlamaForCausalLM": _hf_llama(ours, "sdpa").eval()}
    from transformers import GPT2LMHeadModel

    theirs = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_gpt2(ours, tmp)
        config_path = Path(tmp) / "config.json"
        hf_config = json.loads(config_path.read_text())
        for act in hf_activations:
            config_path.write_text(json.dumps({**hf_config, "activation_function": act}))
            model = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").float()
            theirs[act] = model.eval()
    return theirs
