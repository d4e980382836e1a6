"""Text-to-image on the shapes world, on this CPU: training time, judged quality, sampling speed.

1. **Train** the shipped ``t2i`` recipe (``mmgpt.recipe.run_training``; ``--resume`` continues an
   interrupted run) and time it: wall clock and this process's CPU time.
2. **Judge** (``mmgpt.eval.judge``): the CNN trained on real rendered scenes, cached by its
   config hash; its held-out accuracy on real scenes is reported first, since the quality
   figures mean little below ~95%.
3. **Quality**: ``mmgpt.eval.t2i.evaluate_t2i`` on held-out prompts (shapes world seed 1; the
   recipe trains on seed 0) — the % of images judged to have the prompted shape AND colour,
   per-attribute accuracy, and diversity across seeds.
4. **Sampling**: seconds per image for DDIM and DPM-Solver++ at a few step counts (batch of
   ``--batch`` images, classifier-free guidance on, ``torch.inference_mode``), with the UNet in
   contiguous and in channels_last memory format, and the judged quality at each setting.

Results go to ``OUT/bench_t2i.json`` and a markdown table on stdout. Nothing here is a test.

    python benchmarks/bench_t2i.py --out runs/bench_t2i --train-steps 1800 --threads 1

On a shared machine use one thread: with two OpenMP threads competing with other jobs for
two cores, a training step took 8 s instead of 0.6 s (threads wait for descheduled peers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_t2i", help="run directory (model, results)")
    p.add_argument("--train-steps", type=int, default=1500, help="train.max_steps of the recipe")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--skip-train", action="store_true", help="evaluate the model in --out only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts for quality")
    p.add_argument("--sweep-prompts", type=int, default=64, help="prompts per sampler setting")
    p.add_argument("--sweep-steps", default="10,20,50", help="sampler step counts")
    p.add_argument("--batch", type=int, default=16, help="images per decoder call (speed)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--judge-cache", default=None, help="judge cache root (default ~/.cache)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return p.parse_args(argv)


def train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from mmgpt.recipe import run_training

    overrides = [f"train.max_steps={args.train_steps}", "train.progress=false", *args.overrides]
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_training("t2i", out=out, resume=args.resume, overrides=overrides)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"trained {result['step']} steps in {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return {
        "steps": result["step"],
        "wall_s": wall,
        "cpu_s": cpu,
        "note": "this invocation only (a resumed run counts from where it resumed)",
        "final_train": result.get("train", {}),
        "final_eval": result.get("eval", {}),
    }


def held_out_prompts(recipe: dict[str, Any], n: int) -> list[Any]:
    """One-shape drawing prompts of the recipe's world, seed 1 (the recipe trains on seed 0)."""
    from mmgpt.data.shapes import ShapesWorld
    from mmgpt.eval.t2i import T2IPrompt

    keys = ("kinds", "colors", "sizes", "positions", "image_size")
    options = {k: recipe["data"][k] for k in keys if recipe["data"].get(k) is not None}
    world = ShapesWorld(size=n, task="t2i", max_shapes=1, seed=1, **options)
    prompts = []
    for i in range(n):
        sample = world[i]
        prompts.append(T2IPrompt(sample.conversation[0].text, dict(sample.meta["scene"][0])))
    return prompts


def sampling_speed(
    model: Any, prompts: list[Any], sampler: str, steps: int, guidance: float, batch: int
) -> float:
    """Median seconds per image of the decoder alone (conditioning computed beforehand)."""
    from mmgpt.imagegen import gather_signal_states

    k = len(model.tokenizer.signal_token_ids)
    chunk = [[{"role": "user", "text": p.prompt}] for p in prompts[:batch]]
    processor = model.processor()
    encoded = [processor.encode_prompt(c) for c in chunk]
    with torch.inference_mode():
        # the signal states of a full forward over prompt + [IMG0..]: what generation produces
        ids = [e.input_ids + list(model.tokenizer.signal_token_ids) for e in encoded]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([[model.tokenizer.pad_id] * (width - len(i)) + i for i in ids])
        mask = (torch.arange(width)[None] >= torch.tensor([[width - len(i)] for i in ids])).long()
        hidden = model.gpt(input_ids=input_ids, attention_mask=mask).hidden_states
        positions = torch.tensor([[r, width - k] for r in range(len(ids))])
        condition = model.output_projector(gather_signal_states(hidden, positions, k))
    decoder = model.image_decoder
    decoder.generate(condition, num_inference_steps=2, guidance_scale=guidance, sampler=sampler)
    times = []  # after a warm-up call (first-call allocations, a memory-format conversion)
    for _ in range(3):
        start = time.perf_counter()
        decoder.generate(
            condition, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, seed=0
        )
        times.append((time.perf_counter() - start) / condition.size(0))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmgpt.eval.judge import JudgeConfig, load_or_train_judge
    from mmgpt.eval.t2i import evaluate_t2i
    from mmgpt.imagegen import ImageGenerationConfig
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.recipe import apply_overrides, load_recipe

    out = Path(args.out)
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    if not args.skip_train:
        results["training"] = train(args, out)
    recipe = apply_overrides(load_recipe("t2i"), args.overrides)
    model = MultimodalGPT.from_pretrained(out / "model").eval()

    wall = time.perf_counter()
    judge, judge_accuracy = load_or_train_judge(
        JudgeConfig(image_size=int(model.image_decoder.image_size)),
        cache_dir=args.judge_cache,
        verbose=True,
    )
    results["judge"] = {
        "heldout_accuracy": judge_accuracy,
        "load_or_train_s": time.perf_counter() - wall,
    }
    print(f"judge held-out accuracy on real scenes: {judge_accuracy}", flush=True)

    prompts = held_out_prompts(recipe, args.prompts)
    config = ImageGenerationConfig(steps=20, guidance_scale=args.guidance, sampler="dpm", seed=0)
    quality = evaluate_t2i(
        model, prompts, judge=judge, judge_accuracy=judge_accuracy, image_config=config
    )
    results["quality"] = quality
    print(
        f"shape_and_color {quality['shape_and_color']:.3f} accuracy {quality['accuracy']} "
        f"image_rate {quality['image_rate']:.3f} diversity {quality['diversity']}",
        flush=True,
    )

    sweep = []
    for sampler in ("ddim", "dpm"):
        for steps in [int(s) for s in args.sweep_steps.split(",")]:
            row: dict[str, Any] = {"sampler": sampler, "steps": steps}
            for fmt in ("contiguous", "channels_last"):
                model.image_decoder.channels_last = fmt == "channels_last"
                row[f"s_per_image_{fmt}"] = sampling_speed(
                    model, prompts, sampler, steps, args.guidance, args.batch
                )
            model.image_decoder.channels_last = False
            cfg = ImageGenerationConfig(
                steps=steps, guidance_scale=args.guidance, sampler=sampler, seed=0
            )
            q = evaluate_t2i(
                model,
                prompts[: args.sweep_prompts],
                judge=judge,
                judge_accuracy=judge_accuracy,
                image_config=cfg,
                diversity_prompts=0,
            )
            row["shape_and_color"] = q["shape_and_color"]
            sweep.append(row)
            print(json.dumps(row), flush=True)
    results["sampling"] = sweep

    (out / "bench_t2i.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n| sampler | steps | s/image | s/image (channels_last) | shape+colour |")
    print("|---|---|---|---|---|")
    for row in sweep:
        print(
            f"| {row['sampler']} | {row['steps']} | {row['s_per_image_contiguous']:.4f} | "
            f"{row['s_per_image_channels_last']:.4f} | {row['shape_and_color']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
