"""Greedy decoding speed: mmgpt.generation.generate vs transformers' generate, same weights.

Each contender continues the same prompts by the same number of tokens (no stop token, so
every row runs to the end); the outputs must be identical before anything is timed. A third
row, "mmgpt bare loop", is the least a decoder can do (GPT.forward + KVCache + argmax) and
shows what the generation layer itself costs; a "floor" row times only the weight matmuls of
the same steps (each step streams every weight matrix once), which bounds what any fp32
implementation can reach. transformers runs with "gelu_new" (GPT-2's own config) and
"gelu_pytorch_tanh" (mmgpt's kernel); both compute the same function.

``--family llama`` decodes with the Llama-family benchmark model (grouped-query attention,
SwiGLU, RMSNorm, rotary positions, untied head, vocab 8192) against transformers'
LlamaForCausalLM on the directory ``mmgpt.pretrained.save_hf`` writes.

    python benchmarks/bench_decode.py                  # batch 1 and 8, 200 new tokens
    python benchmarks/bench_decode.py --batch 1 --new-tokens 100 --repeats 9
    python benchmarks/bench_decode.py --n-embd 12      # per-step overhead only
    python benchmarks/bench_decode.py --family llama   # (--n-embd 12: MLP 32 wide)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    HF_TANH_GELUS,
    add_common_args,
    add_family_arg,
    alternate,
    bench_config,
    decode_floor,
    hf_contenders,
    machine_line,
    ours_and_hf,
    print_table,
    setup,
)

from mmgpt.generation import GenerationConfig, generate
from mmgpt.model import GPT, KVCache

FLOOR = "floor: weight matmuls only"


@torch.inference_mode()
def bare_loop(model: GPT, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    cache = KVCache.for_model(model.config, capacity=prompts.size(1) + new_tokens)
    tokens, out = prompts, []
    for _ in range(new_tokens):
        logits = model(input_ids=tokens, past_key_values=cache, logits_to_keep=1).logits
        tokens = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(tokens)
    return torch.cat(out, dim=1)


def contenders(
    ours: GPT, theirs: dict[str, torch.nn.Module], prompts: torch.Tensor, new_tokens: int
) -> dict[str, Callable[[], torch.Tensor]]:
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
    prompt_lists = prompts.tolist()
    mask = torch.ones_like(prompts)

    def mmgpt_generate() -> torch.Tensor:
        return torch.tensor(generate(ours, prompt_lists, config, pad_id=0))

    def hf_generate(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        @torch.inference_mode()
        def run() -> torch.Tensor:
            out = model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            return out[:, prompts.size(1) :]

        return run

    runs = {
        "mmgpt generate": mmgpt_generate,
        "mmgpt bare loop": lambda: bare_loop(ours, prompts, new_tokens),
    }
    for act, model in theirs.items():
        runs[f"transformers generate ({act})"] = hf_generate(model)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_family_arg(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument(
        "--n-embd",
        type=int,
        default=384,
        help="model width; a tiny one (e.g. 12) leaves only per-step framework overhead",
    )
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

    config = bench_config(args.family, n_embd=args.n_embd)
    hf_labels = hf_contenders(args.family, args.hf_activation)
    ours, theirs = ours_and_hf(config, seed=args.seed, hf_activations=hf_labels, family=args.family)
    ours.eval()
    for model in theirs.values():
        model.eval()
    print(f"machine: {machine_line(args.clock)}")
    print(
        f"model ({args.family}): {ours.num_parameters() / 1e6:.3g}M parameters, "
        f"{config.n_layer}×{config.n_embd}, {config.n_head} heads ({config.kv_heads} key/value), "
        f"vocab {config.vocab_size}; prompt {args.prompt_len} tokens, {args.new_tokens} new "
        "tokens, greedy\n"
    )
    rows, ratios = [], []
    g = torch.Generator().manual_seed(args.seed)
    for batch in args.batch:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g)
        runs = contenders(ours, theirs, prompts, args.new_tokens)
        outputs = {name: run() for name, run in runs.items()}
        runs[FLOOR] = decode_floor(ours, batch, args.new_tokens)
        reference = outputs["mmgpt bare loop"]
        for name, tokens in outputs.items():
            if not torch.equal(tokens, reference):
                raise SystemExit(f"batch {batch}: the tokens of {name} differ from mmgpt's")
        timings = alternate(runs, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
        hf_names = [n for n in timings if n.startswith("transformers")]
        hf = timings[hf_names[0]].median
        for name, t in timings.items():
            rows.append(
                [
                    batch,
                    name,
                    f"{t.median / args.new_tokens * 1e3:.2f}",
                    batch * args.new_tokens / t.median,
                    f"{hf / t.median:.2f}×",
                    f"±{50 * t.spread:.0f}%",
                ]
            )
        for name in hf_names:
            hf_t = timings[name].median
            ratios.append(
                (batch, name, hf_t / timings["mmgpt generate"].median, hf_t / timings[FLOOR].median)
            )
    first_hf = hf_labels[0]
    print_table(
        ["batch", "", "ms/step", "tokens/s", f"vs transformers ({first_hf})", "spread"], rows
    )
    print()
    for batch, name, ratio, bound in ratios:
        print(
            f"decode speed at batch {batch}, mmgpt generate / {name}: {ratio:.2f}× "
            f"(bound if all but the weight matmuls were free: {bound:.2f}×)"
        )


if __name__ == "__main__":
    main()
