"""Latent text-to-image on this CPU: what the autoencoder keeps, and what it saves per step.

1. **Reconstruction**: the shipped ``autoencoder`` recipe (``mmgpt.recipe.run_training``) is
   trained once per seed on the shapes world at 64 px (shapes seed 0); the PSNR of its
   reconstructions (posterior mean, decoded) is measured on held-out scenes (shapes seed 1),
   beside the trivial codec at the same compression: an area down-sample and a bilinear
   up-sample, at the VAE's factor (4× per side: 16×16×3 = 768 values per image against the
   latent's 16×16×4 = 1024) and at 18×18 px (972 values, the most RGB pixels that fit in the
   latent's 1024). Reported as mean ± std over the seeds.
2. **Step time**: one training step (forward, backward, AdamW) of the diffusion decoder at
   64 px with the same UNet settings as the ``t2i`` recipe, in pixel space against the latent
   space of the autoencoder of step 1 (its VAE encode, without gradients, included); the two
   alternate inside this process (A B B A …), warm up first, and the median of the repeats is
   reported with the ratio. The GPT and the output projector are the same in both runs, so
   they are left out.

Results go to ``OUT/bench_latent.json`` and a markdown table on stdout. Nothing here is a test.

    python benchmarks/bench_latent.py --out runs/bench_latent --seeds 0 1 2 --train-steps 150 --threads 1 train.batch_size=8

The step times use this process's CPU time (``--clock cpu``, the default) so that other jobs on
a shared machine cannot inflate them; with one thread it equals the wall time of a quiet one.
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
import torch.nn.functional as F

IMAGE = 64
T2I_UNET = {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_latent", help="runs and results go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="autoencoder seeds")
    p.add_argument("--train-steps", type=int, default=300, help="autoencoder train.max_steps")
    p.add_argument("--heldout", type=int, default=128, help="held-out images for the PSNR")
    p.add_argument("--batch", type=int, default=16, help="images per diffusion training step")
    p.add_argument("--repeats", type=int, default=6, help="timed steps per contender")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="autoencoder recipe overrides")
    return p.parse_args(argv)


def heldout_images(n: int) -> torch.Tensor:
    from mmgpt.data.shapes import ShapesWorld
    from mmgpt_diffusion.images import images_to_tensor

    world = ShapesWorld(size=n, image_size=IMAGE, task="caption", max_shapes=3, seed=1)
    return images_to_tensor([world[i].images[0] for i in range(n)], IMAGE)


def train_autoencoder(out: Path, seed: int, steps: int, extra: list[str]) -> tuple[Path, float]:
    from mmgpt.recipe import run_training

    overrides = [
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.save_every={steps}",
        f"train.eval_every={steps}",
        *extra,
    ]
    start = time.process_time()
    result = run_training("autoencoder", out=out, overrides=overrides)
    return Path(result["model_dir"]), time.process_time() - start


def psnr_of(model_dir: Path, images: torch.Tensor) -> dict[str, float]:
    from mmgpt_diffusion import load_autoencoder
    from mmgpt_diffusion.autoencoder_objective import bilinear_round_trip, psnr, reconstruct

    vae = load_autoencoder(model_dir)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    recon = torch.cat([reconstruct(vae, chunk) for chunk in images.split(32)])
    small = F.interpolate(images, size=18, mode="area")
    by_values = F.interpolate(small, size=IMAGE, mode="bilinear", align_corners=False)
    return {
        "vae": float(psnr(recon, images).mean()),
        f"bilinear_x{factor}": float(psnr(bilinear_round_trip(images, factor), images).mean()),
        "bilinear_18px": float(psnr(by_values.clamp(-1, 1), images).mean()),
    }


def step_times(vae_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mmgpt_diffusion import DiffusionDecoder

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    common = {"condition_dim": 64, "num_condition_tokens": 4, "image_size": IMAGE}
    torch.manual_seed(0)
    contenders = {
        "pixel": DiffusionDecoder(unet_config=T2I_UNET, **common),
        "latent": DiffusionDecoder(vae=vae_dir, unet_config=T2I_UNET, **common),
    }
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, IMAGE, IMAGE, generator=g) * 2 - 1
    condition = torch.randn(args.batch, 4, 64, generator=g)
    optimizers = {
        name: torch.optim.AdamW([p for p in dec.parameters() if p.requires_grad], lr=1e-4)
        for name, dec in contenders.items()
    }

    def step(name: str) -> float:
        dec, opt = contenders[name].train(), optimizers[name]
        start = clock()
        dec.training_loss(condition, images).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - start

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name in contenders:  # warm-up
        step(name)
    order = list(contenders)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else reversed(order):
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "seconds_per_step": median,
        "latent_speedup": median["pixel"] / median["latent"],
        "unet_positions": {
            "pixel": IMAGE * IMAGE,
            "latent": contenders["latent"].latent_size ** 2,
        },
        "trainable_parameters": {
            name: sum(p.numel() for p in dec.parameters() if p.requires_grad)
            for name, dec in contenders.items()
        },
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    images = heldout_images(args.heldout)
    runs = []
    for seed in args.seeds:
        model_dir, cpu = train_autoencoder(
            out / f"vae_seed{seed}", seed, args.train_steps, args.overrides
        )
        scores = psnr_of(model_dir, images)
        runs.append({"seed": seed, "train_cpu_s": cpu, **scores})
        print(f"seed {seed}: {scores} ({cpu:.0f} s CPU)", flush=True)
    results["psnr"] = runs
    results["speed"] = step_times(out / f"vae_seed{args.seeds[0]}" / "model", args)
    (out / "bench_latent.json").write_text(json.dumps(results, indent=2) + "\n")

    keys = [k for k in runs[0] if k not in ("seed", "train_cpu_s")]
    print(f"\nPSNR (dB) on {args.heldout} held-out 64 px scenes, {len(runs)} seeds\n")
    print("| codec | PSNR |\n|---|---|")
    for key in keys:
        print(f"| {key} | {mean_std([run[key] for run in runs])} |")
    speed = results["speed"]
    print(f"\nOne diffusion training step, batch {args.batch}, {IMAGE} px ({args.clock} time)\n")
    print("| space | UNet positions | s / step |\n|---|---|---|")
    for name in ("pixel", "latent"):
        positions = speed["unet_positions"][name]
        print(f"| {name} | {positions} | {speed['seconds_per_step'][name]:.3f} |")
    print(f"\nlatent speed-up: {speed['latent_speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
