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

**Your own images** (``--data TRAIN_FOLDER --test-data TEST_FOLDER``, or ``--make-data`` for
generated photo-like pictures of coloured, textured objects on gradient backgrounds, captioned
"a striped red circle" and labelled ``color`` and ``kind``): ``mmgpt train judge`` on the
training folder's labels, then the ``t2i`` recipe on the same folder (prompt template
``draw {text}``) once per ``--seeds``, each evaluated by ``mmgpt eval --task t2i --judge``'s
function on the held-out folder; beside them an untrained model (one step, forced to draw)
and the class-mean image (the mean training picture of the prompt's labels). Results go to
``OUT/bench_t2i_folder.json`` and a table of mean ± std over seeds.

    python benchmarks/bench_t2i.py --out runs/bench_t2i_folder --make-data --train-steps 400 --threads 1

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
    p.add_argument("--data", help="an imagefolder to train on (with --test-data): folder mode")
    p.add_argument("--test-data", help="folder mode: held-out imagefolder to evaluate on")
    p.add_argument(
        "--make-data", action="store_true", help="folder mode on generated object pictures"
    )
    p.add_argument("--per-class", type=int, default=40, help="--make-data: training pictures")
    p.add_argument("--test-per-class", type=int, default=8, help="--make-data: test pictures")
    p.add_argument("--labels", default="color,kind", help="folder mode: the judge's labels")
    p.add_argument("--judge-steps", type=int, default=600, help="folder mode: judge steps")
    p.add_argument(
        "--judge-overrides",
        type=str.split,
        default=["objective.shift=4", "objective.flip=true"],
        help="folder mode: judge recipe overrides, space-separated (default: shifts and flips, "
        "which the colour and kind labels do not depend on)",
    )
    p.add_argument(
        "--seeds",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[0, 1, 2],
        help="folder mode: training seeds",
    )
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


# --------------------------------------------------------------------------------------
# Your own images: --data IMAGEFOLDER (or --make-data DIR for a generated one)
# --------------------------------------------------------------------------------------

OBJECT_COLOURS = {
    "red": (200, 40, 35),
    "green": (40, 150, 60),
    "blue": (40, 70, 200),
    "yellow": (225, 190, 40),
}
OBJECT_KINDS = ("circle", "square", "triangle")
TEXTURES = ("plain", "striped", "dotted")


def draw_object(kind: str, colour: str, texture: str, rng: Any, size: int = 48) -> Any:
    """A photo-like picture of one object: a two-colour gradient background with grain, the
    object at a random place and size with jittered colour, a texture and a soft shadow,
    slightly blurred (JPEG artefacts come from saving)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    top, bottom = (rng.uniform(0.55, 0.95, 3) * 255 for _ in range(2))
    ramp = np.linspace(0, 1, size)[:, None, None]
    background = top * (1 - ramp) + bottom * ramp + rng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype("uint8")).convert("RGB")
    r = int(rng.integers(9, 15))
    cx, cy = (int(rng.integers(r + 2, size - r - 2)) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    mask = Image.new("L", (size, size), 0)
    shape = ImageDraw.Draw(mask)
    if kind == "circle":
        shape.ellipse(box, fill=255)
    elif kind == "square":
        shape.rectangle(box, fill=255)
    else:
        shape.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=255)
    shadow = Image.new("RGB", (size, size), (40, 40, 40))
    image.paste(shadow, (2, 2), mask.filter(ImageFilter.GaussianBlur(2)).point(lambda v: v // 2))
    base = np.array(OBJECT_COLOURS[colour], dtype=float) * rng.uniform(0.8, 1.15)
    fill = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255)
    if texture == "striped":
        fill[(np.arange(size)[:, None] + np.arange(size)[None, :]) % 6 < 2] *= 0.6
    elif texture == "dotted":
        yy, xx = np.mgrid[:size, :size]
        fill[(yy % 5 < 2) & (xx % 5 < 2)] *= 0.6
    image.paste(Image.fromarray(fill.astype("uint8")), (0, 0), mask)
    return image.filter(ImageFilter.GaussianBlur(0.5))


def make_object_folder(root: Path, per_class: int, seed: int) -> Path:
    """An imagefolder of ``per_class`` pictures of each colour × kind, captioned ("a striped
    red circle") and labelled (``color``, ``kind``), saved as JPEG."""
    import numpy as np

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in OBJECT_COLOURS:
        for kind in OBJECT_KINDS:
            for i in range(per_class):
                texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
                name = f"images/{colour}_{kind}_{i:03d}.jpg"
                draw_object(kind, colour, texture, rng).save(root / name, quality=85)
                words = f"{texture} {colour}" if texture != "plain" else colour
                rows.append(
                    {"file_name": name, "text": f"a {words} {kind}", "color": colour, "kind": kind}
                )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def class_mean_baseline(train_dir: Path, test_dir: Path, judge_dir: Path, size: int) -> dict:
    """Drawings that are the mean real training image of the prompt's labels: what a model
    that knows each class's average picture but no single object would score."""
    from mmgpt.data.images import load_image
    from mmgpt.eval.image_stats import distribution_report
    from mmgpt.eval.judge import images_to_tensor, load_judge
    from mmgpt.eval.judge_training import read_labelled_rows, row_label

    judge, meta = load_judge(judge_dir)
    sources = list(meta["label_sources"])

    def read(folder: Path) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
        rows = read_labelled_rows(folder)
        images = images_to_tensor([load_image(r.image) for r in rows], size, crop=True)
        return images, [tuple(row_label(r, s) for s in sources) for r in rows]

    train_images, train_labels = read(train_dir)
    test_images, test_labels = read(test_dir)
    means = {
        key: train_images[[i for i, k in enumerate(train_labels) if k == key]].mean(0)
        for key in set(train_labels)
    }
    drawn = torch.stack([means[key] for key in test_labels])
    to_judge = torch.nn.functional.interpolate(drawn, size=judge.image_size, mode="bilinear")
    real_to_judge = torch.nn.functional.interpolate(
        test_images, size=judge.image_size, mode="bilinear"
    )
    verdicts = judge.predict(to_judge)
    accuracy = {
        s: sum(v[s] == k[j] for v, k in zip(verdicts, test_labels)) / len(test_labels)
        for j, s in enumerate(sources)
    }
    accuracy["all"] = sum(
        all(v[s] == k[j] for j, s in enumerate(sources)) for v, k in zip(verdicts, test_labels)
    ) / len(test_labels)
    features = ("judge", judge.embed(to_judge), judge.embed(real_to_judge))
    return {
        "accuracy": accuracy,
        "distribution": distribution_report(drawn, test_images, features=features),
    }


FOLDER_FIGURES = {  # name → path in the eval result
    "judged all labels": ("judge", "accuracy", "all"),
    "judged color": ("judge", "accuracy", "color"),
    "judged kind": ("judge", "accuracy", "kind"),
    "Fréchet (judge features)": ("distribution", "frechet_distance"),
    "colour histogram distance": ("distribution", "histogram_distance"),
    "diversity (RMS pixel distance)": ("distribution", "generated", "diversity"),
}


def _get(result: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        result = result[key] if result is not None else None
    return result


def main_folder(args: argparse.Namespace, out: Path) -> int:
    """Train a judge and the t2i recipe on an imagefolder, for each seed, and evaluate the
    drawings on held-out rows against two baselines (an untrained model, class means)."""
    from mmgpt.eval.t2i import run_t2i_eval
    from mmgpt.recipe import run_training

    if args.make_data:
        train_dir = make_object_folder(out / "data" / "train", args.per_class, seed=100)
        test_dir = make_object_folder(out / "data" / "test", args.test_per_class, seed=200)
    else:
        if not args.test_data:
            raise SystemExit("--data needs --test-data (held-out rows of the same kind)")
        train_dir, test_dir = Path(args.data), Path(args.test_data)
    quiet = ["train.progress=false"]
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    judge_dir = out / "judge"
    if not (judge_dir / "model" / "judge.json").is_file():
        wall = time.perf_counter()
        run_training(
            "judge",
            data=train_dir,
            out=judge_dir,
            overrides=[
                f"train.max_steps={args.judge_steps}",
                f"data.labels=[{args.labels}]",
                *args.judge_overrides,
                *quiet,
            ],
        )
        results["judge_train_s"] = time.perf_counter() - wall
    template = "data.prompt_template=draw {text}"
    runs: dict[str, dict] = {}
    for name, steps, seed in [
        ("untrained (1 step)", 1, 0),
        *((f"seed {s}", args.train_steps, s) for s in args.seeds),
    ]:
        run_dir = out / name.replace(" ", "-").replace("(", "").replace(")", "")
        if not (run_dir / "model").is_dir():
            wall = time.perf_counter()
            overrides = [f"train.max_steps={steps}", f"train.seed={seed}", template, *quiet]
            run_training(
                "t2i", data=train_dir, out=run_dir, overrides=[*overrides, *args.overrides]
            )
            print(
                f"{name}: trained {steps} steps in {time.perf_counter() - wall:.0f} s", flush=True
            )
        runs[name] = run_t2i_eval(
            run_dir / "model",
            test_dir,
            judge_dir=judge_dir,
            guidance_scale=args.guidance,
            seed=0,
            force_image=steps == 1,  # the untrained model would not emit the signal tokens
        )
        print(
            name,
            json.dumps({k: _get(runs[name], p) for k, p in FOLDER_FIGURES.items()}),
            flush=True,
        )
    first = runs[f"seed {args.seeds[0]}"]
    results["judge"] = {
        k: first["judge"][k] for k in ("heldout_accuracy", "real_accuracy", "chance")
    }
    results["runs"] = runs
    results["class_mean"] = class_mean_baseline(train_dir, test_dir, judge_dir, 32)
    (out / "bench_t2i_folder.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    trained = [runs[f"seed {s}"] for s in args.seeds]
    mean_image = results["class_mean"]
    print(
        f"\njudge: held-out {results['judge']['heldout_accuracy']}, on the real test images "
        f"{results['judge']['real_accuracy']}, chance {results['judge']['chance']}"
    )
    print(
        f"\n| figure | trained ({len(trained)} seeds, mean ± std) | untrained | class-mean image | real images |"
    )
    print("|---|---|---|---|---|")
    for label, path in FOLDER_FIGURES.items():
        values = [_get(r, path) for r in trained]
        if None in values:
            print(f"| {label} | n/a (a run drew no image) | | | |")
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        if path[0] == "judge":
            baseline = mean_image["accuracy"][path[-1]]
            real = first["judge"]["real_accuracy"][path[-1]]
        else:
            baseline = _get(mean_image, path)
            real = first["distribution"]["real"]["diversity"] if path[-1] == "diversity" else None
        untrained = _get(runs["untrained (1 step)"], path)
        cells = [f"{statistics.mean(values):.3f} ± {spread:.3f}"]
        cells += ["" if v is None else f"{v:.3f}" for v in (untrained, baseline, real)]
        print(f"| {label} | {' | '.join(cells)} |")
    return 0


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
    if args.data or args.make_data:
        return main_folder(args, out)
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
