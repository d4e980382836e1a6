"""Length grouping (``train.length_grouping``): training steps on batches of similar length.

The shapes-tiny recipe's ``more_questions`` stage (captions and up to four questions about an
image, batch 32) pads its batches to their longest sample, so about a quarter of the tokens it
computes are padding. This trains the shipped model's architecture on that stage's data,
with the plain loader and with length grouping (windows of ``--window`` batches), the two
taking turns in rounds on copies of the same weights, and prints per loader: the share of
real tokens in the batches, the mean time of a whole step (the loader's batch, forward,
backward, AdamW; the mean, since a grouped loader reads a whole window at its first batch),
and the ratio.

    python benchmarks/bench_length_grouping.py              # ~2 min, 2 cores
    python benchmarks/bench_length_grouping.py --steps 40 --rounds 5

Not a test; the data order differs with grouping, so only the speed is compared here.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table

from mmgpt.data.loader import ResumableLoader
from mmgpt.demo import default_model_dir
from mmgpt.multimodal import MultimodalGPT
from mmgpt.objectives.diffusion import DiffusionObjective
from mmgpt.recipe.build import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="timed steps per round and loader")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=16, help="batches per grouping window")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    base = MultimodalGPT.from_pretrained(default_model_dir())
    base.trainable("gpt+projector")
    processor = base.processor()
    mix = {"caption": 1, "vqa": 4, "t2i": 0}
    data = make_dataset(
        "shapes",
        {"task": "mixed", "task_weights": mix, "questions_per_image": 4, "size": 200_000},
        32,
    )
    objective = DiffusionObjective(diffusion_weight=0.0)
    runs = {}
    for name, window in (("plain", 0), (f"grouped ({args.window})", args.window)):
        model = copy.deepcopy(base).train()
        params = [p for p in model.parameters() if p.requires_grad]
        loader = ResumableLoader(
            data, args.batch_size, seed=0, collate_fn=processor, length_grouping=window
        )
        runs[name] = {
            "model": model,
            "optimizer": torch.optim.AdamW(params, lr=1e-4),
            "stream": loader.forever(),
            "times": [],
            "real": 0,
            "computed": 0,
        }

    def step(run: dict) -> None:
        start = time.perf_counter()
        batch = next(run["stream"])
        loss = objective(run["model"], batch).loss
        loss.backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        run["times"].append(time.perf_counter() - start)
        run["real"] += int(batch.attention_mask.sum())
        run["computed"] += batch.attention_mask.numel()

    # warm-up, untimed (allocator, caches): one window, so that the timed steps read whole
    # windows, one every --window steps, as long as steps x rounds is a multiple of it
    for run in runs.values():
        for _ in range(max(3, args.window)):
            step(run)
        run.update(times=[], real=0, computed=0)
    for _ in range(args.rounds):  # the loaders take turns, so drift hits both alike
        for run in runs.values():
            for _ in range(args.steps):
                step(run)

    print(machine_line())
    print(
        f"shapes-tiny more_questions data, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    plain = statistics.fmean(runs["plain"]["times"])
    rows = []
    for name, run in runs.items():
        mean = statistics.fmean(run["times"])
        rows.append(
            [
                name,
                f"{run['real'] / run['computed']:.3f}",
                f"{run['computed'] / len(run['times']):.0f}",
                f"{mean * 1000:.0f}",
                f"{plain / mean:.2f}x",
            ]
        )
    print_table(["loader", "real tokens share", "tokens a batch", "mean step (ms)", "speed"], rows)


if __name__ == "__main__":
    main()
