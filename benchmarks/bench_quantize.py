"""Weight-only int8 / int4 against fp32 on the same trained language models: held-out
perplexity (what ``mmgpt eval --task lm`` prints) and greedy decoding tokens/s, per seed.

1. **Train** a GPT with the shipped ``lm`` recipe (``mmgpt.recipe.run_training`` = ``mmgpt
   train lm``) on Python source text from this interpreter's standard library (packages
   ``--train-packages``), one run per seed.
2. **Quantise** each trained model with ``mmgpt quantize`` (``--method int8``, and ``--method
   int4 --group-size G``).
3. **Measure** on held-out text (packages ``--eval-packages``, never trained on): the
   perplexity ``mmgpt eval --task lm`` reports (run through ``mmgpt.cli.main``), and greedy
   decoding at batch 1 and 8 (prompt 32 tokens, ``--new-tokens`` new ones; the three models
   take turns, the order flipped every round, median of ``--repeats``) (decoding uses the fused CPU kernels,
   perplexity the dequantising path: the same perplexity is also computed one token at a
   time through the KV cache, as decoding runs, with the share of top-1 tokens equal to
   fp32's).

Reported: mean ± std over seeds of perplexity, its change against fp32, tokens/s and its
ratio to fp32, and the greedy agreement; fp32 is the baseline beside each.

    OMP_NUM_THREADS=1 python benchmarks/bench_quantize.py --out runs/bench_quantize

Not a test; a script to read.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, cpu_model_name

from mmgpt.cli import main as mmgpt_main
from mmgpt.config import gpt_config
from mmgpt.generation import GenerationConfig, generate
from mmgpt.model import GPT, KVCache
from mmgpt.pretrained import load_model, load_tokenizer
from mmgpt.quantization import quantize_model
from mmgpt.recipe import run_training

METHODS = ("fp32", "int8", "int4")


def write_corpus(packages: list[str], target: Path) -> Path:
    """The ``*.py`` files of standard-library ``packages``, concatenated (sorted: stable)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for pkg in packages for p in (stdlib / pkg).rglob("*.py"))
    if not files:
        raise SystemExit(f"no .py files under {stdlib} for {packages}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files))
    return target


def train(args: argparse.Namespace, seed: int, corpus: Path) -> Path:
    out = Path(args.out) / f"seed{seed}"
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        print(f"reusing {model_dir}", flush=True)
        return model_dir
    overrides = [
        f"model.n_layer={args.n_layer}",
        f"model.n_head={args.n_head}",
        f"model.n_embd={args.n_embd}",
        "model.block_size=128",
        "model.dropout=0.0",
        f"tokenizer.vocab_size={args.vocab_size}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        "train.warmup_steps=30",
        "train.eval_every=0",
        "train.save_every=0",
        "train.keep_last=1",
        "train.log_every=50",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
        f"train.seed={seed}",
        "data.eval_fraction=0",
    ]
    run_training("lm", data=corpus, out=out, overrides=overrides)
    return model_dir


def cli_json(argv: list[str]) -> dict[str, Any]:
    """Run ``mmgpt ARGV`` in this process; its printed JSON."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = mmgpt_main(argv)
    if code != 0:
        raise SystemExit(f"mmgpt {' '.join(argv)} failed ({code})")
    return json.loads(printed.getvalue())


def measure_seed(args: argparse.Namespace, model_dir: Path, held_out: Path) -> dict[str, Any]:
    dirs = {"fp32": model_dir}
    for method in ("int8", "int4"):
        target = model_dir.parent / f"model-{method}"
        argv = ["quantize", "--model", str(model_dir), "--out", str(target), "--method", method]
        if method == "int4":
            argv += ["--group-size", str(args.group_size)]
        report = cli_json(argv)
        dirs[method] = target
        print(
            f"  {method}: weights {report['weights_bytes_before']:,} → "
            f"{report['weights_bytes_after']:,} bytes",
            flush=True,
        )
    result: dict[str, Any] = {m: {} for m in METHODS}
    for method, directory in dirs.items():
        metrics = cli_json(
            ["eval", "--model", str(directory), "--data", str(held_out), "--task", "lm"]
        )
        result[method]["perplexity"] = metrics["perplexity"]
        result[method]["weights_bytes"] = (directory / "model.safetensors").stat().st_size

    models = {m: load_model(d) for m, d in dirs.items()}
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(held_out.read_text(encoding="utf-8")[:20000])
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for batch in (1, 8):
        prompts = [ids[i * 500 : i * 500 + 32] for i in range(batch)]
        speed, _ = decode_speed(models, prompts, args, pad)
        for method in METHODS:
            result[method][f"tokens_per_s_b{batch}"] = speed[method]
    scores = decode_path_scores(models, ids, segments=4, length=128)
    for method in METHODS:
        result[method].update(scores[method])
    return result


def decode_speed(
    models: dict[str, torch.nn.Module], prompts: list[list[int]], args: argparse.Namespace, pad: int
) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Greedy tokens/s of each model on ``prompts`` (interleaved, median), and its tokens."""
    config = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    outputs: dict[str, list[list[int]]] = {}

    def decoder(method: str):
        def run() -> None:
            outputs[method] = generate(models[method], prompts, config, pad_id=pad)

        return run

    timings = alternate({m: decoder(m) for m in models}, repeats=args.repeats)
    tokens = len(prompts) * args.new_tokens
    return {m: tokens / timings[m].median for m in models}, outputs


def decode_path_scores(
    models: dict[str, torch.nn.Module], ids: list[int], segments: int, length: int
) -> dict[str, dict[str, float]]:
    """Teacher-forced, one token at a time with the KV cache (the path decoding takes: the
    fused kernels): perplexity of the held-out next tokens, and how often each model's top-1
    token equals fp32's."""
    nll: dict[str, float] = {}
    top1: dict[str, list[int]] = {}
    targets = [ids[s * length + 1 : (s + 1) * length] for s in range(segments)]
    for method, model in models.items():
        total, picks = 0.0, []
        with torch.no_grad():
            for s in range(segments):
                cache = KVCache.for_model(model.config, length)
                for t in range(length - 1):
                    token = torch.tensor([[ids[s * length + t]]])
                    logits = model(token, past_key_values=cache, use_cache=True).logits[0, -1]
                    total -= torch.log_softmax(logits.float(), -1)[targets[s][t]].item()
                    picks.append(int(logits.argmax()))
        nll[method], top1[method] = total / len(picks), picks
    return {
        method: {
            "decode_perplexity": math.exp(nll[method]),
            "top1_agreement": 100
            * sum(a == b for a, b in zip(top1[method], top1["fp32"]))
            / len(top1["fp32"]),
        }
        for method in models
    }


def speed_only(args: argparse.Namespace, size: str) -> dict[str, dict[str, float]]:
    """Decoding tokens/s of a wider GPT with random weights (speed only: nothing to measure
    quality on), quantised in memory as ``mmgpt quantize`` does."""
    n_layer, n_embd = (int(v) for v in size.split("x"))
    config = gpt_config(
        "gpt-nano",
        n_layer=n_layer,
        n_head=n_embd // 64,
        n_embd=n_embd,
        block_size=128,
        vocab_size=args.vocab_size,
        dropout=0.0,
    )
    models = {}
    for method in METHODS:
        torch.manual_seed(0)
        models[method] = GPT(config).eval()
        if method != "fp32":
            quantize_model(models[method], method, args.group_size if method == "int4" else None)
    rows: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for batch in (1, 8):
        prompts = torch.randint(0, args.vocab_size, (batch, 32)).tolist()
        speed, _ = decode_speed(models, prompts, args, pad=0)
        for method in METHODS:
            rows[method][f"tokens_per_s_b{batch}"] = speed[method]
    return rows


def mean_std(values: list[float]) -> str:
    def fmt(x: float) -> str:
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"

    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_quantize")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-packages", default="email,http,logging,unittest")
    parser.add_argument("--eval-packages", default="json,concurrent")
    parser.add_argument(
        "--speed-sizes",
        default="6x384,12x768",
        help="LAYERSxWIDTH of random-weight GPTs whose decoding speed is also measured",
    )
    parser.add_argument("--speed-only", action="store_true", help="only those")
    args = parser.parse_args()
    sizes = [s for s in args.speed_sizes.split(",") if s]
    if args.speed_only:
        print_speed_rows(args, {size: speed_only(args, size) for size in sizes})
        return

    out = Path(args.out)
    corpus = write_corpus(args.train_packages.split(","), out / "corpus" / "train.txt")
    held_out = write_corpus(args.eval_packages.split(","), out / "corpus" / "held_out.txt")
    per_seed = {}
    for seed in args.seeds:
        print(f"seed {seed}: training ...", flush=True)
        model_dir = train(args, seed, corpus)
        per_seed[seed] = measure_seed(args, model_dir, held_out)
        print(json.dumps(per_seed[seed]), flush=True)
    (out / "results.json").write_text(
        json.dumps({"settings": vars(args), "seeds": per_seed}, indent=2)
    )

    print(
        f"\n{cpu_model_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(args.seeds)} seeds, mean ± std"
    )
    print_quality_rows(args, per_seed)
    speed = {size: speed_only(args, size) for size in sizes}
    (out / "results.json").write_text(
        json.dumps({"settings": vars(args), "seeds": per_seed, "speed_only": speed}, indent=2)
    )
    print_speed_rows(args, speed)


def print_quality_rows(args: argparse.Namespace, per_seed: dict[int, Any]) -> None:
    print(
        "\n| model | weights (MB) | held-out perplexity | vs fp32 | same, decoding path | vs fp32 "
        "| top-1 = fp32 (%) | tokens/s b1 | vs fp32 | tokens/s b8 | vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        rows = [per_seed[s][method] for s in args.seeds]
        base = [per_seed[s]["fp32"] for s in args.seeds]
        values = {key: [r[key] for r in rows] for key in rows[0]}
        change = {
            key: "–"
            if method == "fp32"
            else mean_std([100 * (r[key] / b[key] - 1) for r, b in zip(rows, base)]) + " %"
            for key in ("perplexity", "decode_perplexity")
        }
        ratio = {
            key: mean_std([r[key] / b[key] for r, b in zip(rows, base)]) + "x"
            for key in ("tokens_per_s_b1", "tokens_per_s_b8")
        }
        print(
            f"| {method} | {rows[0]['weights_bytes'] / 1e6:.2f} | "
            f"{mean_std(values['perplexity'])} | {change['perplexity']} | "
            f"{mean_std(values['decode_perplexity'])} | {change['decode_perplexity']} | "
            f"{mean_std(values['top1_agreement'])} | "
            f"{mean_std(values['tokens_per_s_b1'])} | {ratio['tokens_per_s_b1']} | "
            f"{mean_std(values['tokens_per_s_b8'])} | {ratio['tokens_per_s_b8']} |"
        )


def print_speed_rows(
    args: argparse.Namespace, speed: dict[str, dict[str, dict[str, float]]]
) -> None:
    print(
        f"\nDecoding speed only (random weights, vocab {args.vocab_size}, int4 group {args.group_size}):"
    )
    print("\n| GPT (layers x width) | model | tokens/s b1 | vs fp32 | tokens/s b8 | vs fp32 |")
    print("|---|---|---|---|---|---|")
    for size, rows in speed.items():
        for method in METHODS:
            r, b = rows[method], rows["fp32"]
            print(
                f"| {size} | {method} | {r['tokens_per_s_b1']:.1f} | "
                f"{r['tokens_per_s_b1'] / b['tokens_per_s_b1']:.2f}x | "
                f"{r['tokens_per_s_b8']:.1f} | {r['tokens_per_s_b8'] / b['tokens_per_s_b8']:.2f}x |"
            )


if __name__ == "__main__":
    main()
