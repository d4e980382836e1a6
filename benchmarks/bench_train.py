"""Training throughput: mmgpt's GPT vs transformers' GPT2LMHeadModel on the same weights.

One step = forward, cross-entropy over every position, backward, AdamW update; fp32 on CPU.
Both contenders compute the loss the same way (outside the model) and use the same optimizer
settings, so the difference is the model code. transformers runs twice: with "gelu_new" (what
GPT2Config and the released GPT-2 checkpoints say) and with "gelu_pytorch_tanh" (the same fused
kernel mmgpt calls); both compute the same function. A "floor" row times only the step's
weight matmuls and attention, the work any implementation must do. Also prints the model
FLOP utilisation (MFU) against the machine's measured fp32 matmul peak.

``--family llama`` runs the Llama-family benchmark model (grouped-query attention, SwiGLU,
RMSNorm, rotary positions, untied head, vocab 8192) against transformers' LlamaForCausalLM,
which loads the directory ``mmgpt.pretrained.save_hf`` writes.

``--variants`` adds mmgpt rows for what the trainer's ``train.compile: true`` and
``train.precision: bf16`` do: ``torch.compile(model)`` (as :func:`mmgpt.distributed.wrap_model`
compiles a single-process model) and the forward under ``torch.autocast("cpu", torch.bfloat16)``
(fp32 master weights and optimizer, as the trainer runs it), alone and together, each on its own
copy of the same initial weights. The first-step loss of each must match fp32 eager (compile
within 1e-4, bf16 within 2%), and the loss after the timed steps is printed beside the speed.
The compile happens in the untimed first step; its time is printed.

    python benchmarks/bench_train.py                   # 6×384, context 256, batch 8
    python benchmarks/bench_train.py --repeats 9 --steps 3
    python benchmarks/bench_train.py --family llama
    python benchmarks/bench_train.py --variants compile bf16 bf16+compile --hf-activation gelu_pytorch_tanh
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    HF_TANH_GELUS,
    add_common_args,
    add_family_arg,
    alternate,
    bench_config,
    hf_contenders,
    machine_line,
    matmul_flops_per_s,
    ours_and_hf,
    print_table,
    setup,
    training_floor,
    training_flops_per_token,
)

FLOOR = "floor: matmuls + attention only"


VARIANTS = ("compile", "bf16", "bf16+compile")


def make_step(
    model: torch.nn.Module,
    batch: torch.Tensor,
    is_hf: bool,
    optimizer_impl: str,
    variant: str = "",
):
    """One training step of ``model``; ``variant`` "compile" / "bf16" / "bf16+compile" does
    what the trainer's train.compile / train.precision=bf16 do."""
    x, y = batch[:, :-1], batch[:, 1:]
    opts = (
        {"fused": True} if optimizer_impl == "fused" else {"foreach": optimizer_impl == "foreach"}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **opts)
    model.train()
    forward = torch.compile(model) if "compile" in variant else model
    bf16 = "bf16" in variant

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            if is_hf:
                logits = forward(input_ids=x, use_cache=False).logits
            else:
                logits = forward(input_ids=x).logits
        logits = logits.float()  # the loss in fp32, as under the trainer's autocast
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_family_arg(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed round")
    parser.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused")
    parser.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    parser.add_argument(
        "--hf-activation",
        nargs="+",
        choices=HF_TANH_GELUS,
        default=None,
        help="transformers' name(s) for the tanh GELU; one contender per name (GPT-2 only; "
        "default: both)",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=[],
        help="also time mmgpt with train.compile / train.precision=bf16 (module docstring)",
    )
    args = parser.parse_args(argv)
    setup(args)

    config = bench_config(args.family, block_size=args.context)
    ours, theirs = ours_and_hf(
        config,
        seed=args.seed,
        hf_attn=args.hf_attn,
        hf_activations=hf_contenders(args.family, args.hf_activation),
        family=args.family,
    )
    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.context + 1), generator=g)

    initial = copy.deepcopy(ours.state_dict())
    steps = {"mmgpt": make_step(ours, batch, False, args.optimizer)}
    for variant in args.variants:
        twin = copy.deepcopy(ours)
        twin.load_state_dict(initial)
        steps[f"mmgpt ({variant})"] = make_step(twin, batch, False, args.optimizer, variant)
    for act, model in theirs.items():
        steps[f"transformers ({act})"] = make_step(model, batch, True, args.optimizer)
    # Same weights, same data: the first losses must agree, or the comparison is meaningless.
    first, first_call = {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        first[name] = step()
        first_call[name] = time.perf_counter() - start
    fp32 = {n: v for n, v in first.items() if "bf16" not in n}
    if max(fp32.values()) - min(fp32.values()) > 1e-4:
        raise SystemExit(f"first-step losses differ: {first}")
    for name, loss in first.items():
        if "bf16" in name and abs(loss - first["mmgpt"]) > 0.02 * first["mmgpt"]:
            raise SystemExit(f"{name}: first-step loss {loss} is not within 2% of fp32's")
    last: dict[str, float] = {}

    steps[FLOOR] = training_floor(ours, args.batch, args.context)
    peak_before = matmul_flops_per_s(2048, clock=args.clock)

    def timed(name: str, step):
        def run() -> None:
            for _ in range(args.steps):
                loss = step()
            if loss is not None:
                last[name] = loss

        return run

    timings = alternate(
        {n: timed(n, s) for n, s in steps.items()},
        repeats=args.repeats,
        warmup=args.warmup,
        clock=args.clock,
    )
    peak = max(peak_before, matmul_flops_per_s(2048, clock=args.clock))

    tokens = args.batch * args.context * args.steps
    flops_per_token = training_flops_per_token(config, args.context)
    print(f"machine: {machine_line(args.clock)}")
    print(
        f"model ({args.family}): {ours.num_parameters() / 1e6:.2f}M parameters, "
        f"{config.n_layer}×{config.n_embd}, {config.n_head} heads ({config.kv_heads} key/value), "
        f"MLP {config.mlp_hidden}{' gated' if config.gated_mlp else ''}, context {args.context}, "
        f"batch {args.batch}, vocab {config.vocab_size}; AdamW ({args.optimizer}); first-step "
        f"loss {first['mmgpt']:.4f}"
    )
    print(f"fp32 matmul peak (2048²): {peak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs per token: {flops_per_token / 1e6:.1f} MFLOP (6·N + 12·L·C·T)\n")
    rows = []
    for name, t in timings.items():
        tok_s = tokens / t.median
        rows.append(
            [
                name,
                f"{t.median / args.steps * 1e3:.0f}",
                tok_s,
                f"{tok_s * flops_per_token / 1e9:.1f}",
                f"{100 * tok_s * flops_per_token / peak:.0f}%",
                f"±{50 * t.spread:.0f}%",
                f"{timings['mmgpt'].median / t.median:.2f}×",
                f"{first[name]:.4f}" if name in first else "",
                f"{last[name]:.4f}" if name in last else "",
            ]
        )
    steps_done = 1 + (args.warmup + args.repeats) * args.steps
    print_table(
        [
            "",
            "ms/step",
            "tokens/s",
            "GFLOP/s",
            "MFU",
            "spread",
            "vs mmgpt fp32 eager",
            "first-step loss",
            f"loss after {steps_done} steps",
        ],
        rows,
    )
    print()
    for name in steps:
        if name.startswith("mmgpt ("):
            print(f"{name}: first step (compiling, if any) {first_call[name]:.1f} s wall")
    ours_t, floor_t = timings["mmgpt"].median, timings[FLOOR].median
    for name, t in timings.items():
        if name.startswith("transformers"):
            print(
                f"training speed, mmgpt / {name}: {t.median / ours_t:.2f}× "
                f"(bound if all but matmuls and attention were free: {t.median / floor_t:.2f}×)"
            )


if __name__ == "__main__":
    main()
