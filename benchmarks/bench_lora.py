"""LoRA vs full fine-tuning on a transfer task of the shapes world.

1. **Base**: the caption recipe trains a MultimodalGPT (tiny ViT + MLP projector + GPT) on
   one-shape scenes drawn WITHOUT one colour (``--held-out``, default cyan).
2. **Fine-tune** the base (``model.from=base/model``) on scenes of every colour, the same
   number of steps, three ways, each in its own process so that its peak memory is its own:
   ``full`` (what the recipe trains: the GPT and the projector; its tiny ViT stays at its
   random initialisation, see caption.yaml), ``lora`` (``--adapter lora`` on the GPT and the
   projector, everything else frozen) and ``lora-emb`` (the same plus the token embeddings,
   tied to the LM head, trained in full: ``adapter.train_extra=transformer.wte``).
3. **Evaluate** every model by greedy captioning of held-out scenes (another seed): exact
   match overall, on scenes of the new colour, and on the colours the base knew.

Reported per mode: trainable parameters, median optimizer-step time, peak RSS of the
process (``resource.getrusage``; torch's CPU allocations are invisible to tracemalloc), and
caption exact match. ``--memory-model`` adds a memory comparison for a larger GPT (25.5M
parameters, random tokens, a few steps), where weights and optimizer state are no longer lost
in the interpreter's own footprint: full fine-tuning, LoRA on the fp32 base, and LoRA on an
int8, int4 (group 128) or NF4 (block 64) base (QLoRA,
:func:`mmgpt.adapters.quantize.quantize_base`), each in its own process; ``--memory-only``
runs just that. Besides the peak RSS (which, for QLoRA, is the fp32 model built before it is
quantised), the resident memory during the training steps is sampled from
``/proc/self/statm``, and the bytes of the frozen weights (parameters that do not train,
and buffers) are counted exactly.

    python benchmarks/bench_lora.py --out runs/bench_lora --memory-model   # ~10 min, 2 cores
    python benchmarks/bench_lora.py --memory-only                          # ~1 min
    python benchmarks/bench_lora.py --base-error                           # seconds

``--base-error`` prints how far each QLoRA base quantisation (int8; int4 and nf4 at group
sizes 64 and 128) moves the decoder weights of the shipped ``shapes-tiny`` model:
``||W - Q(W)|| / ||W||`` over its Linear matrices, with the bytes each stores per weight,
and the time to dequantise a 2048x512 matrix (what QLoRA pays twice per adapted layer and
step; median of 30, the methods taking turns).

Everything runs through the public entry points (``mmgpt.recipe.run_training`` = ``mmgpt
train``, ``mmgpt.eval.run``), so the figures are what a user gets. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ALL_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
MODES = ("full", "lora", "lora-emb")
LORA_MODES = ("lora", "lora-emb")
# --memory-model: full fine-tuning, LoRA on the fp32 base, LoRA on an int8 / int4 / nf4 base
MEMORY_MODES = (
    "memory-full",
    "memory-lora",
    "memory-qlora-int8",
    "memory-qlora-int4",
    "memory-qlora-nf4",
)
GROUP_SIZES = {"int8": None, "int4": 128, "nf4": 64}  # nf4: the QLoRA paper's block size


def common_overrides(args: argparse.Namespace, steps: int) -> list[str]:
    return [
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch_size}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.keep_last=1",
        "train.log_every=25",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
        f"train.seed={args.seed}",
        "data.max_shapes=1",
        f"data.kinds={json.dumps(args.kinds.split(','))}",
        "data.eval_fraction=0",
    ]


def base_overrides(args: argparse.Namespace) -> list[str]:
    seen = [c for c in ALL_COLORS if c != args.held_out]
    return [
        *common_overrides(args, args.base_steps),
        "train.warmup_steps=50",
        f"data.size={args.base_steps * args.batch_size}",
        f"data.colors={json.dumps(seen)}",
        "data.seed=0",
        "tokenizer.vocab_size=384",
    ]


def finetune_overrides(args: argparse.Namespace, mode: str, base_dir: Path) -> list[str]:
    lr = args.full_lr if mode == "full" else args.lora_lr
    out = [
        *common_overrides(args, args.steps),
        f"model.from={base_dir}",
        f"train.lr={lr}",
        f"train.min_lr={lr / 10}",
        "train.warmup_steps=20",
        f"data.size={args.steps * args.batch_size}",
        f"data.colors={json.dumps(ALL_COLORS)}",
        "data.seed=2",  # not the base's scenes
    ]
    if mode in LORA_MODES:
        out += [
            "adapter.method=lora",
            f"adapter.r={args.rank}",
            f"adapter.alpha={2 * args.rank}",
            f"adapter.targets={args.targets}",
        ]
    if mode == "lora-emb":
        # the token embeddings (tied to the LM head) train in full too: the new colour's word
        # is spelled with tokens the base barely trained, which a frozen head cannot emit
        out.append("adapter.train_extra=transformer.wte")
    return out


# -- one training run per process -------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Run one fine-tune (or the base) here and write timings and peak memory as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from mmgpt import trainer
    from mmgpt.recipe import run_training

    step_times: list[float] = []
    train_step = trainer.Trainer.train_step

    def timed(self, micro_batches):  # the optimizer step: forward, backward, AdamW
        start = time.perf_counter()
        metrics = train_step(self, micro_batches)
        step_times.append(time.perf_counter() - start)
        return metrics

    trainer.Trainer.train_step = timed
    out = Path(args.out)
    if args.worker == "base":
        overrides, run_dir = base_overrides(args), out / "base"
    else:
        overrides = finetune_overrides(args, args.worker, out / "base" / "model")
        run_dir = out / args.worker
    start = time.perf_counter()
    result = run_training("caption", out=run_dir, overrides=overrides)
    wall = time.perf_counter() - start
    record = {
        "mode": args.worker,
        "steps": result["step"],
        "final_loss": result["train"].get("loss"),
        "step_time_s": statistics.median(step_times[5:] or step_times),
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (run_dir / "bench.json").write_text(json.dumps(record, indent=2))


def memory_worker(args: argparse.Namespace) -> None:
    """A few LM steps of a larger GPT, full or LoRA; peak RSS of this process."""
    import torch

    torch.set_num_threads(args.threads)
    from mmgpt.adapters import AdapterConfig, add_adapter, trainable_summary
    from mmgpt.config import gpt_config
    from mmgpt.model import GPT

    torch.manual_seed(0)
    config = gpt_config("gpt-nano", n_layer=8, n_head=8, n_embd=512, block_size=128, vocab_size=512)
    model = GPT(config)
    if args.worker != "memory-full":
        add_adapter(model, AdapterConfig(r=args.rank, alpha=2 * args.rank, targets=["decoder"]))
    trainable, total = trainable_summary(model)  # total: of the fp32 model
    if args.worker.startswith("memory-qlora-"):
        from mmgpt.adapters.quantize import quantize_base

        method = args.worker.removeprefix("memory-qlora-")
        quantize_base(model, method, GROUP_SIZES[method])
    # the frozen base: parameters that do not train, and buffers (a quantised base's weights)
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    frozen_mb = sum(t.numel() * t.element_size() for t in frozen) / 2**20
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 512, (4, 65))  # small batch: weights and optimizer state dominate
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    current_before = current_rss_mb()
    times, training_rss = [], []
    for _ in range(4):
        start = time.perf_counter()
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training_rss.append(current_rss_mb())  # activations and gradients still alive here
        optimizer.step()
        times.append(time.perf_counter() - start)
        training_rss.append(current_rss_mb())
    record = {
        "mode": args.worker,
        "trainable": trainable,
        "total": total,
        "frozen_weights_mb": frozen_mb,
        "rss_before_training_mb": before,
        "current_rss_before_training_mb": current_before,
        "max_current_rss_in_training_mb": max(training_rss),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_time_s": statistics.median(times[1:]),
    }
    print(json.dumps(record))


def current_rss_mb() -> float:
    """This process's resident memory now (ru_maxrss only rises: a QLoRA run's float model,
    freed when its layers are quantised, would hide what training itself holds)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_process(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--worker", mode, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if mode.startswith("memory"):
        # a fixed mmap threshold: glibc then returns every freed tensor of 64 KiB or more to
        # the system at once, so resident memory follows the live tensors; by default it
        # raises the threshold after the first large free and keeps later ones in its heap
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if mode.startswith("memory"):
        return json.loads(done.stdout.strip().splitlines()[-1])
    record = json.loads((Path(args.out) / mode / "bench.json").read_text())
    # what the Trainer printed: "parameters: 1,234 trainable / 5,678 total; ..."
    found = re.search(r"parameters: ([\d,]+) trainable / ([\d,]+) total", done.stdout)
    if found:
        record["trainable"], record["total"] = (int(g.replace(",", "")) for g in found.groups())
    return record


# -- evaluation ------------------------------------------------------------------------------


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy captions of held-out one-shape scenes of every colour: exact match overall, on
    scenes of the new colour, and on the others."""
    import torch

    from mmgpt.adapters import trainable_summary
    from mmgpt.data.shapes import ShapesWorld
    from mmgpt.eval.metrics import exact_match
    from mmgpt.eval.run import eval_items, generate_replies
    from mmgpt.multimodal import MultimodalGPT

    torch.set_num_threads(args.threads)
    model = MultimodalGPT.from_pretrained(model_dir).eval()  # with its adapter, if any
    trainable, total = trainable_summary(model)
    size = model.encoders["image"].input_size[-1]
    data = ShapesWorld(
        size=args.eval_size,
        seed=1,
        task="caption",
        max_shapes=1,
        kinds=args.kinds.split(","),
        image_size=size,
    )
    items = eval_items(data)
    start = time.perf_counter()
    predictions = generate_replies(model, items, batch_size=50, max_new_tokens=24)
    seconds = time.perf_counter() - start
    new = [i for i, item in enumerate(items) if item.meta["scene"][0]["color"] == args.held_out]
    old = [i for i in range(len(items)) if i not in set(new)]

    def em(idx: list[int]) -> float:
        return 100 * exact_match([predictions[i] for i in idx], [items[i].reference for i in idx])

    return {
        "exact_match": em(list(range(len(items)))),
        "exact_match_new_colour": em(new),
        "exact_match_seen_colours": em(old),
        "n": len(items),
        "n_new_colour": len(new),
        "loaded_trainable": trainable,
        "loaded_total": total,
        "eval_s": seconds,
        "example_new_colour": [(predictions[i], items[i].reference) for i in new[:3]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_lora", help="output directory")
    parser.add_argument("--held-out", default="cyan", choices=ALL_COLORS)
    parser.add_argument(
        "--kinds",
        default="circle,square,triangle",
        help="shape kinds of every scene (few: the base masters them, so the fine-tune is "
        "about the new colour)",
    )
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per mode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="decoder,projector")
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--memory-model", action="store_true", help="also the larger-GPT test")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the larger-GPT memory test"
    )
    parser.add_argument(
        "--base-error", action="store_true", help="only the weight error of each QLoRA base"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.base_error:
        print_base_error()
        return
    if args.worker in MEMORY_MODES:
        memory_worker(args)
        return
    if args.worker:
        worker(args)
        return
    if args.memory_only:
        print_memory_rows({mode: run_process(args, mode) for mode in MEMORY_MODES})
        return

    out = Path(args.out)
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}}
    if (out / "base" / "model" / "config.json").is_file():
        print(f"reusing the base model in {out / 'base'}", flush=True)
        if (out / "base" / "bench.json").is_file():
            results["base_run"] = json.loads((out / "base" / "bench.json").read_text())
    else:
        print("training the base (without the held-out colour) ...", flush=True)
        results["base_run"] = run_process(args, "base")
    for mode in MODES:
        print(f"fine-tuning: {mode} ...", flush=True)
        results[mode] = run_process(args, mode)
    for mode in ("base", *MODES):
        model_dir = out / mode / "model"
        print(f"evaluating {mode} ...", flush=True)
        results.setdefault(mode, {}).update(evaluate(model_dir, args))
        if mode == "base":
            results[mode].update(results.get("base_run", {}))
    if args.memory_model:
        for mode in MEMORY_MODES:
            print(f"{mode} ...", flush=True)
            results[mode] = run_process(args, mode)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(
        f"\n| mode | trainable / total | step (s) | peak RSS (MB) | EM all | EM {args.held_out} "
        "| EM seen colours |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in ("base", *MODES):
        r = results[mode]
        step = f"{r['step_time_s']:.3f}" if "step_time_s" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        counts = "-"
        if "trainable" in r:
            share = 100 * r["trainable"] / r["total"]
            counts = f"{r['trainable']:,} / {r['total']:,} ({share:.1f}%)"
        print(
            f"| {mode} | {counts} | {step} | {rss} | {r['exact_match']:.1f} | "
            f"{r['exact_match_new_colour']:.1f} | {r['exact_match_seen_colours']:.1f} |"
        )
    if args.memory_model:
        print_memory_rows({mode: results[mode] for mode in MEMORY_MODES})


def print_base_error() -> None:
    """The relative weight error of each base quantisation on shapes-tiny's decoder."""
    from mmgpt.adapters.quantize import quantize_base
    from mmgpt.model import GPT
    from mmgpt.pretrained import load_model

    gpt = load_model(HERE.parents[1] / "mmgpt" / "assets" / "shapes-tiny").gpt
    assert isinstance(gpt, GPT)
    import torch

    torch.set_num_threads(1)
    bases = [("int8", None), ("int4", 64), ("int4", 128), ("nf4", 64), ("nf4", 128)]
    big = torch.nn.Linear(512, 2048)
    timed = {}
    for method, group in bases:
        model = torch.nn.Sequential(big)
        wrapped = copy_for_lora(model, targets=["0"])
        quantize_base(wrapped, method, group)
        timed[method, group] = wrapped.get_submodule("0").base_layer
    times: dict[Any, list[float]] = {key: [] for key in timed}
    for _ in range(30):
        for key, layer in timed.items():
            start = time.perf_counter()
            layer.dequantize(torch.float32)
            times[key].append(time.perf_counter() - start)
    print("\n| base | group | bytes per weight | relative error | dequantise 2048x512 (ms) |")
    print("|---|---|---|---|---|")
    for method, group in bases:
        model = copy_for_lora(gpt)
        layers = quantize_base(model, method, group)
        num = den = 0.0
        weights = nbytes = 0
        for name in layers:
            quantized = model.get_submodule(name).base_layer
            original = gpt.get_submodule(name).weight.detach()
            num += (quantized.weight.float() - original).pow(2).sum().item()
            den += original.pow(2).sum().item()
            weights += original.numel()
            nbytes += sum(
                t.numel() * t.element_size() for n, t in quantized.named_buffers() if n != "bias"
            )
        ms = 1000 * statistics.median(times[method, group])
        print(
            f"| {method} | {group or 'row'} | {nbytes / weights:.3f} | {(num / den) ** 0.5:.4f} "
            f"| {ms:.2f} |"
        )


def copy_for_lora(model: Any, targets: tuple[str, ...] | list[str] = ("decoder",)) -> Any:
    """A copy of ``model`` with a LoRA adapter on ``targets`` (what quantize_base quantises)."""
    import copy

    from mmgpt.adapters import AdapterConfig, add_adapter

    model = copy.deepcopy(model)
    add_adapter(model, AdapterConfig(r=8, targets=list(targets)))
    return model


def print_memory_rows(results: dict[str, dict[str, Any]]) -> None:
    print(
        "\n| mode | trainable | frozen weights (MB) | RSS before training (MB) "
        "| RSS in training, max (MB) | peak RSS (MB) | step (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        share = 100 * r["trainable"] / r["total"]
        print(
            f"| {mode.removeprefix('memory-')} | {r['trainable']:,} ({share:.1f}%) | "
            f"{r['frozen_weights_mb']:.1f} | {r['current_rss_before_training_mb']:.0f} | "
            f"{r['max_current_rss_in_training_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['step_time_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
