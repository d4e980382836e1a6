"""Training the image encoder: linear-probe accuracy of its features, before and after.

For each seed, the tiny ViT (``vit_tiny_custom``) of the shipped recipes is measured

1. at its **random initialization**: the encoder of a ``caption`` run that keeps it frozen,
   as the shipped ``caption`` and ``shapes-tiny`` recipes do (the same initialization the
   two caption runs below start from: same recipe, seed and tokenizer);
2. after **caption training with the encoder at the GPT's learning rate** (``caption`` with
   ``train.train_encoder=true``);
3. after the same caption training with **the encoder's lr scaled by 0.1**
   (``train.lr_multipliers.encoder=0.1``);
4. after **contrastive pretraining** (the ``clip`` recipe, CLIP's loss; ``--loss siglip``);
5. after **contrastive pretraining, then caption training** at 0.1 (``caption`` with
   ``model.from=`` the ``clip`` run's model; ``--no-followup`` skips it);
6. after **supervised pretraining on the per-cell labels** (the ``tagging`` recipe);
7. and a **caption run on that encoder, frozen** (``caption`` with ``model.encoder.from=`` the
   ``tagging`` run's model: its own GPT, so the caption loss is the encoder's doing alone).

The measure is :func:`mmgpt.eval.probe.shapes_probe`: logistic regression on the encoder's
mean-pooled features of the 720 one-shape scenes of the shapes world, half of them held out
(split by the seed), predicting the kind of shape (5 classes) and its colour (8). Every run
trains on one-shape scenes (``data.max_shapes=1``, shapes world seed 0) for ``--steps``
steps with the recipe's other settings; the caption runs also report their held-out caption
loss. Each training run goes through ``mmgpt.recipe.run_training``, as ``mmgpt train`` does.
Results go to ``OUT/bench_encoder.json`` and a markdown table (mean ± std over the seeds) on
stdout. ``--rows`` runs some of the rows only and keeps the others' results from an earlier
``OUT/bench_encoder.json``. Nothing here is a test.

    python benchmarks/bench_encoder.py --out runs/bench_encoder --steps 400 --seeds 3
    python benchmarks/bench_encoder.py --rows tagging,tagging_caption_frozen   # two rows

The run directories under ``OUT/seed<N>/`` are replaced on every invocation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROWS = {
    "caption_frozen": "random init (frozen in caption training, as shipped)",
    "caption_x1": "caption training, encoder at the GPT's lr",
    "caption_x0.1": "caption training, encoder lr × 0.1",
    "clip": "contrastive pretraining (`clip`)",
    "clip_caption_x0.1": "`clip`, then caption training, encoder lr × 0.1",
    "tagging": "supervised pretraining on the cells' labels (`tagging`)",
    "tagging_caption_frozen": "`tagging`, then caption training, encoder frozen",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_encoder", help="where the runs and results go")
    p.add_argument("--steps", type=int, default=400, help="train.max_steps of every run")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (train.seed, probe split)")
    p.add_argument("--loss", default="clip", choices=("clip", "siglip"), help="objective.loss")
    p.add_argument("--multiplier", type=float, default=0.1, help="the encoder's lr multiplier")
    p.add_argument("--no-followup", action="store_true", help="skip clip → caption (row 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rows", default=",".join(ROWS), help="the rows to run, comma-separated")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows are {', '.join(ROWS)}")
    return args


def train(recipe: str, out: Path, overrides: list[str]) -> tuple[dict[str, Any], float]:
    from mmgpt.recipe import run_training

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = run_training(recipe, out=out, overrides=overrides)
    return result, time.perf_counter() - start


def probe(encoder: Any, seed: int) -> dict[str, float]:
    from mmgpt.eval.probe import shapes_probe

    results = shapes_probe(encoder, seed=seed)
    return {
        **{k: r.accuracy for k, r in results.items()},
        **{f"chance_{k}": r.chance for k, r in results.items()},
    }


def trained_encoder(result: dict[str, Any]) -> Any:
    from mmgpt.multimodal import MultimodalGPT

    return MultimodalGPT.from_pretrained(result["model_dir"]).encoders["image"]


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, dict[str, float]]:
    common = [
        "data.max_shapes=1",
        f"train.max_steps={args.steps}",
        f"train.seed={seed}",
        f"train.eval_every={args.steps}",
        f"train.save_every={args.steps}",
        "train.eval_batches=4",
        "train.log_every=50",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
    ]
    encoder = "train.train_encoder=true"
    multiplier = f"train.lr_multipliers.encoder={args.multiplier}"
    runs = {
        "caption_frozen": ("caption", ["train.train_encoder=false"]),
        "caption_x1": ("caption", [encoder]),
        "caption_x0.1": ("caption", [encoder, multiplier]),
        "clip": ("clip", [f"objective.loss={args.loss}"]),
    }
    if not args.no_followup:
        clip_model = out / "clip" / "model"
        runs["clip_caption_x0.1"] = ("caption", [f"model.from={clip_model}", encoder, multiplier])
    runs["tagging"] = ("tagging", [])
    tagged = f"model.encoder.from={out / 'tagging' / 'model'}"
    runs["tagging_caption_frozen"] = ("caption", [tagged, "train.train_encoder=false"])
    chosen = args.rows.split(",")
    rows: dict[str, dict[str, float]] = {}
    for name, (recipe, extra) in runs.items():
        if name not in chosen:
            continue
        result, seconds = train(recipe, out / name, [*common, *extra])
        metrics = probe(trained_encoder(result), seed)
        held_out = result["eval"]
        if recipe == "clip":
            metrics["retrieval"] = held_out.get("image_to_text", float("nan"))
        elif recipe == "tagging":
            metrics["labels"] = held_out.get("accuracy", float("nan"))
        else:
            metrics["caption_loss"] = held_out.get("loss", float("nan"))
            metrics["token_accuracy"] = held_out.get("token_accuracy", float("nan"))
        metrics["seconds"] = seconds
        rows[name] = metrics
        print(f"seed {seed} {name}: {metrics}", flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(per_seed: list[dict[str, dict[str, float]]]) -> str:
    lines = [
        "| encoder | kind of shape | colour | held-out caption loss | s / run |",
        "|---|---|---|---|---|",
    ]
    for key, label in ROWS.items():
        runs = [seed[key] for seed in per_seed if key in seed]
        if not runs:
            continue

        def column(name: str, runs: list[dict[str, float]] = runs) -> str:
            return mean_std([r[name] for r in runs])

        if "retrieval" in runs[0]:
            loss = f"— (retrieval in a batch of 64: {column('retrieval')})"
        elif "labels" in runs[0]:
            loss = f"— (held-out labels right: {column('labels')})"
        else:
            loss = column("caption_loss")
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(
            f"| {label} | {column('shape')} | {column('color')} | {loss} | {seconds:.0f} |"
        )
    first = [seed["caption_frozen"] for seed in per_seed]
    shape = statistics.mean(r["chance_shape"] for r in first)
    color = statistics.mean(r["chance_color"] for r in first)
    lines.append(f"| chance (the most frequent held-out label) | {shape:.3f} | {color:.3f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    per_seed = [run_seed(args, seed, out / f"seed{seed}") for seed in range(args.seeds)]
    wall = time.perf_counter() - start
    earlier = out / "bench_encoder.json"
    if earlier.is_file() and set(args.rows.split(",")) != set(ROWS):
        # the rows not run this time keep their results of the earlier run
        before = json.loads(earlier.read_text())["per_seed"]
        per_seed = [{**old, **new} for old, new in zip(before, per_seed)]
    results = {
        "args": vars(args),
        "torch_threads": torch.get_num_threads(),
        "wall_s": wall,
        "per_seed": per_seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_encoder.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{args.seeds} seeds, {args.steps} steps per run, {wall:.0f} s in all\n")
    print(table(per_seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
