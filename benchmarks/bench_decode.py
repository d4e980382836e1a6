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

Faster mmgpt paths, each a row of its own:

- "mmgpt generate (compile)": ``GenerationConfig(compile=True)``, a static KV cache and a
  ``torch.compile``'d decode step (the compile happens in the warm-up round; its time is
  printed). On by default; ``--no-compile`` leaves it out.
- ``--speculative``: speculative decoding at batch 1 with a draft model, eager and compiled.
  A random model's greedy continuation repeats one token, which any draft predicts, so here
  every contender uses the benchmark model TRAINED briefly (``--train-steps``) on shapes-world
  captions (token = byte; template words are predictable, the shapes' attributes random), the
  draft (``--draft-layers`` × ``--draft-width``) trained the same way, and the prompts are
  held-out captions. The trained weights are kept in ``--trained-dir`` for later runs.
- ``--int8`` / ``--int4``: the model quantised weight-only (``mmgpt.quantization``; int4
  with groups of ``--group-size``), eager, compiled (unless ``--no-compile``) and with
  ``--speculative`` as the target of speculative decoding. Its tokens are not the fp32 ones:
  the "quality" column gives where they first differ (and, trained, the held-out loss).
- ``--trained``: every contender uses the briefly trained model and held-out caption prompts
  (as ``--speculative`` does) without the speculative rows, so that the quantised rows print
  a held-out loss beside the fp32 one.

    python benchmarks/bench_decode.py                  # batch 1 and 8, 200 new tokens
    python benchmarks/bench_decode.py --batch 1 --new-tokens 100 --repeats 9
    python benchmarks/bench_decode.py --n-embd 12      # per-step overhead only
    python benchmarks/bench_decode.py --family llama   # (--n-embd 12: MLP 32 wide)
    python benchmarks/bench_decode.py --batch 1 --speculative --int8 --threads 1 --clock cpu
    python benchmarks/bench_decode.py --batch 1 --trained --int8 --int4 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
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
    held_out_loss,
    hf_contenders,
    hf_twins,
    machine_line,
    ours_and_hf,
    print_table,
    setup,
    shapes_text,
    train_briefly,
)

from mmgpt.generation import GenerationConfig, generate
from mmgpt.model import GPT, KVCache

FLOOR = "floor: weight matmuls only"
REFERENCE = "mmgpt bare loop"


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
    ours: GPT,
    theirs: dict[str, torch.nn.Module],
    prompts: torch.Tensor,
    new_tokens: int,
    fast: dict[str, Callable[[list[list[int]]], torch.Tensor]] | None = None,
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
        REFERENCE: lambda: bare_loop(ours, prompts, new_tokens),
    }
    for name, run in (fast or {}).items():
        runs[name] = lambda run=run: run(prompt_lists)
    for act, model in theirs.items():
        runs[f"transformers generate ({act})"] = hf_generate(model)
    return runs


def fast_paths(
    ours: GPT, batch: int, new_tokens: int, args: argparse.Namespace, draft: GPT | None
) -> dict[str, Callable[[list[list[int]]], torch.Tensor]]:
    """The compiled, speculative and int8 contenders that apply at this batch size."""
    greedy = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
    compiled = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, compile=True)
    k = args.draft_tokens
    paths: dict[str, Callable[[list[list[int]]], torch.Tensor]] = {}

    def add(name: str, model: GPT, config: GenerationConfig, **kwargs) -> None:
        def run(prompts: list[list[int]]) -> torch.Tensor:
            out = generate(model, prompts, config, pad_id=0, return_dict=True, **kwargs)
            if out.speculative is not None:
                ACCEPTANCE.setdefault(name, []).append(out.speculative.acceptance_rate)
            return torch.tensor(out.tokens)

        paths[name] = run

    if args.compile:
        add("mmgpt generate (compile)", ours, compiled)
    if draft is not None and batch == 1:
        add(f"mmgpt speculative (k={k})", ours, greedy, draft_model=draft, num_draft_tokens=k)
        if args.compile:
            add(
                f"mmgpt speculative + compile (k={k})",
                ours,
                compiled,
                draft_model=draft,
                num_draft_tokens=k,
            )
    for method in quantized_methods(args):
        quantized = quantized_copy(ours, method, args.group_size)
        if quantized is None:
            continue
        add(f"mmgpt generate ({method} weights)", quantized, greedy)
        if args.compile:
            add(f"mmgpt generate ({method} weights + compile)", quantized, compiled)
        if draft is not None and batch == 1:
            add(
                f"mmgpt speculative, {method} target (k={k})",
                quantized,
                greedy,
                draft_model=draft,
                num_draft_tokens=k,
            )
    return paths


ACCEPTANCE: dict[str, list[float]] = {}  # acceptance rate of each speculative call, by row
QUANTIZED_LOSS: dict[str, float] = {}  # held-out loss of the quantised model, by method


def quantized_methods(args: argparse.Namespace) -> list[str]:
    return [method for method in ("int8", "int4") if getattr(args, method)]


def quantized_copy(model: GPT, method: str, group_size: int | None = None) -> GPT | None:
    """A copy of ``model`` with ``method`` (int8 / int4) weight-only linear layers, when mmgpt
    has them."""
    try:
        from mmgpt.quantization import quantize_model
    except ImportError:
        print(f"--{method}: this checkout has no mmgpt.quantization; {method} rows left out")
        return None
    quantized = copy.deepcopy(model)
    quantize_model(quantized, method, group_size if method == "int4" else None)
    return quantized.eval()


def first_divergence(tokens: torch.Tensor, reference: torch.Tensor) -> str:
    """Quality of a contender's greedy tokens against the fp32 reference's."""
    if torch.equal(tokens, reference):
        return "identical"
    differ = (tokens != reference).int()
    first = differ.argmax(dim=1)  # first differing position of each row (0 where none)
    rows = [int(f) for f, d in zip(first, differ.any(dim=1)) if d]
    return f"first differs at token {min(rows)} of {reference.size(1)} ({len(rows)} rows differ)"


def trained_models(
    config, args: argparse.Namespace
) -> tuple[GPT, GPT, torch.Tensor, dict[str, float]]:
    """The benchmark model and a draft, trained briefly on shapes-world captions (or loaded
    from ``--trained-dir``), the held-out text, and how the training went."""
    from mmgpt.model import GPT as _GPT

    data = torch.tensor(list(shapes_text(20_000, seed=args.seed)))
    held_out = torch.tensor(list(shapes_text(400, seed=args.seed + 1)))
    draft_config = bench_config(
        args.family,
        n_layer=args.draft_layers,
        n_embd=args.draft_width,
        n_head=max(1, args.draft_width // 64),
        **({"n_kv_head": max(1, args.draft_width // 128)} if args.family == "llama" else {}),
    )
    out_dir = Path(args.trained_dir) / f"{args.family}-{config.n_embd}-{args.train_steps}"
    info: dict[str, float] = {}
    models = {}
    for name, cfg in (("target", config), ("draft", draft_config)):
        path = out_dir / name
        if (path / "model.safetensors").is_file():
            models[name] = _GPT.from_pretrained(path)
            print(f"{name}: loaded from {path}")
            continue
        torch.manual_seed(args.seed)
        model = _GPT(cfg)
        start = time.process_time()
        losses = train_briefly(model, data, args.train_steps, batch=4, seed=args.seed)
        info[f"{name} training CPU s"] = time.process_time() - start
        print(
            f"{name}: trained {args.train_steps} steps (batch 4 × 256 bytes) in "
            f"{info[f'{name} training CPU s']:.0f} CPU s, loss {losses[0]:.2f} → {losses[-1]:.3f}"
        )
        model.save_pretrained(path)
        models[name] = model
    for name, model in models.items():
        info[f"{name} held-out loss"] = held_out_loss(model, held_out)
    return models["target"], models["draft"], held_out, info


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
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time GenerationConfig(compile=True) (default: on)",
    )
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="batch 1: speculative decoding with a draft model; every contender then uses the "
        "briefly trained benchmark model and held-out caption prompts",
    )
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens proposed per round")
    parser.add_argument("--draft-layers", type=int, default=2, help="layers of the draft model")
    parser.add_argument("--draft-width", type=int, default=192, help="width of the draft model")
    parser.add_argument(
        "--train-steps", type=int, default=300, help="--speculative: training steps per model"
    )
    parser.add_argument(
        "--trained-dir",
        default=str(Path.home() / ".cache" / "mmgpt-bench"),
        help="--speculative: where the trained models are kept and looked for",
    )
    parser.add_argument(
        "--int8", action="store_true", help="also time the model quantised to int8 weight-only"
    )
    parser.add_argument(
        "--int4", action="store_true", help="also time the model quantised to int4 weight-only"
    )
    parser.add_argument(
        "--group-size", type=int, default=None, help="--int4: input features per group (128)"
    )
    parser.add_argument(
        "--trained",
        action="store_true",
        help="use the briefly trained model and held-out prompts (as --speculative does) "
        "without the speculative rows",
    )
    args = parser.parse_args(argv)
    setup(args)

    config = bench_config(args.family, n_embd=args.n_embd)
    hf_labels = hf_contenders(args.family, args.hf_activation)
    draft, held_out, info = None, None, {}
    if args.speculative or args.trained:
        ours, draft, held_out, info = trained_models(config, args)
        draft = draft if args.speculative else None
        theirs = hf_twins(ours, hf_labels, args.family)
    else:
        ours, theirs = ours_and_hf(
            config, seed=args.seed, hf_activations=hf_labels, family=args.family
        )
    ours.eval()
    for model in theirs.values():
        model.eval()
    print(f"machine: {machine_line(args.clock)}")
    print(
        f"model ({args.family}): {ours.num_parameters() / 1e6:.3g}M parameters, "
        f"{config.n_layer}×{config.n_embd}, {config.n_head} heads ({config.kv_heads} key/value), "
        f"vocab {config.vocab_size}; prompt {args.prompt_len} tokens, {args.new_tokens} new "
        "tokens, greedy"
    )
    if draft is not None:
        print(
            f"draft: {draft.num_parameters() / 1e6:.3g}M parameters, "
            f"{draft.config.n_layer}×{draft.config.n_embd}; held-out loss (nats/byte): target "
            f"{info['target held-out loss']:.3f}, draft {info['draft held-out loss']:.3f}"
        )
    elif held_out is not None:
        print(f"held-out loss (nats/byte): {info['target held-out loss']:.4f}")
    print()
    rows, ratios, notes = [], [], []
    g = torch.Generator().manual_seed(args.seed)
    for batch in args.batch:
        if held_out is not None:  # held-out captions, cut anywhere
            starts = torch.randint(0, held_out.numel() - args.prompt_len, (batch,), generator=g)
            prompts = torch.stack([held_out[s : s + args.prompt_len] for s in starts.tolist()])
        else:
            prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g)
        fast = fast_paths(ours, batch, args.new_tokens, args, draft)
        runs = contenders(ours, theirs, prompts, args.new_tokens, fast)
        outputs = {}
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            if "compile" in name:
                notes.append(
                    f"batch {batch}, {name}: first call (compiling) "
                    f"{time.perf_counter() - start:.1f} s wall"
                )
        runs[FLOOR] = decode_floor(ours, batch, args.new_tokens)
        reference = outputs[REFERENCE]
        quality = {}
        for name, tokens in outputs.items():
            quality[name] = first_divergence(tokens, reference)
            # eager fp32 contenders must agree exactly, or the comparison is meaningless
            if quality[name] != "identical" and name not in fast:
                raise SystemExit(f"batch {batch}: the tokens of {name} differ from mmgpt's")
            method = next((m for m in quantized_methods(args) if m in name), None)
            eager_name = f"mmgpt generate ({method} weights)"
            if method is not None and name != eager_name and eager_name in outputs:
                # the compiled kernels against the eager ones: the same model's tokens
                quality[name] += f"; vs eager {method}: "
                quality[name] += first_divergence(tokens, outputs[eager_name])
            if method is not None and held_out is not None:
                if method not in QUANTIZED_LOSS:
                    quantized = quantized_copy(ours, method, args.group_size)
                    QUANTIZED_LOSS[method] = held_out_loss(quantized, held_out)
                quality[name] += (
                    f"; held-out loss {QUANTIZED_LOSS[method]:.4f} "
                    f"(fp32 {info['target held-out loss']:.4f})"
                )
        ACCEPTANCE.clear()
        timings = alternate(runs, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
        hf_names = [n for n in timings if n.startswith("transformers")]
        hf = timings[hf_names[0]].median
        for name, t in timings.items():
            accepted = ACCEPTANCE.get(name)
            rows.append(
                [
                    batch,
                    name,
                    f"{t.median / args.new_tokens * 1e3:.2f}",
                    batch * args.new_tokens / t.median,
                    f"{hf / t.median:.2f}×",
                    f"±{50 * t.spread:.0f}%",
                    f"{100 * sum(accepted) / len(accepted):.0f}%" if accepted else "",
                    quality.get(name, ""),
                ]
            )
        for name in hf_names:
            hf_t = timings[name].median
            fastest = min(
                (n for n in timings if n.startswith("mmgpt")), key=lambda n: timings[n].median
            )
            ratios.append(
                (
                    batch,
                    name,
                    hf_t / timings["mmgpt generate"].median,
                    hf_t / timings[FLOOR].median,
                    fastest,
                    hf_t / timings[fastest].median,
                )
            )
    first_hf = hf_labels[0]
    print_table(
        [
            "batch",
            "",
            "ms/token",
            "tokens/s",
            f"vs transformers ({first_hf})",
            "spread",
            "draft accepted",
            "quality (greedy tokens vs fp32 eager)",
        ],
        rows,
    )
    print()
    for batch, name, ratio, bound, fastest, fastest_ratio in ratios:
        print(
            f"decode speed at batch {batch}, mmgpt generate / {name}: {ratio:.2f}× "
            f"(bound if all but the weight matmuls were free: {bound:.2f}×); fastest mmgpt "
            f"path, {fastest}: {fastest_ratio:.2f}×"
        )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
