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

    python benchmarks/bench_train.py                   # 6×384, context 256, batch 8
    python benchmarks/bench_train.py --repeats 9 --steps 3
    python benchmarks/bench_train.py --family llama
"""

from __future__ import annotations

import argparse
import sys
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


def make_step(model: torch.nn.Module, batch: torch.Tensor, is_hf: bool, optimizer_impl: str):
    x, y = batch[:, :-1], batch[:, 1:]
    opts = (
        {"fused": True} if optimizer_impl == "fused" else {"foreach": optimizer_impl == "foreach"}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **opts)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if is_hf:
            logits = model(input_ids=x, use_cache=False).logits
        else:
            logits = model(input_ids=x).logits
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

    steps = {"mmgpt": make_step(ours, batch, False, args.optimizer)}
    for act, model in theirs.items():
        steps[f"transformers ({act})"] = make_step(model, batch, True, args.optimizer)
    # Same weights, same data: the first losses must agree, or the comparison is meaningless.
    first = {name: step() for name, step in steps.items()}
    if max(first.values()) - min(first.values()) > 1e-4:
        raise SystemExit(f"first-step losses differ: {first}")

    steps[FLOOR] = training_floor(ours, args.batch, args.context)
    peak_before = matmul_flops_per_s(2048, clock=args.clock)
    timings = alternate(
        {n: (lambda s=s: [s() for _ in range(args.steps)]) for n, s in steps.items()},
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
            ]
        )
    print_table(["", "ms/step", "tokens/s", "GFLOP/s", "MFU", "spread"], rows)
    print()
    ours_t, floor_t = timings["mmgpt"].median, timings[FLOOR].median
    for name, t in timings.items():
        if name.startswith("transformers"):
            print(
                f"training speed, mmgpt / {name}: {t.median / ours_t:.2f}× "
                f"(bound if all but matmuls and attention were free: {t.median / floor_t:.2f}×)"
            )


if __name__ == "__main__":
    main()
