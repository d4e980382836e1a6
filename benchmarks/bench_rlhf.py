"""RLHF on the shapes world: a weak captioner → reward model → PPO, GRPO, RLOO and DPO.

The preference is programmatic: a caption is better the fewer attributes it gets wrong
(:func:`mmgpt.rlhf.shapes.caption_errors`). One run (one ``--seed``)

1. trains one caption SFT run (1000 steps, a checkpoint every 25) and takes as the deliberately
   weak policy the FIRST checkpoint whose exact match on 200 validation images (another seed
   than the test images) lies in ``--weak-band`` (0.25–0.40; else the closest), so every
   seed starts from a policy equally far from right (``results.json``: ``weak_policy``);
2. trains a reward model, starting from the end of that SFT run, on ranked lists per image:
   the right caption, two captions wrong in ONLY each attribute, captions wrong in one to
   three attributes and eight captions SAMPLED FROM THE WEAK POLICY, each ranked by the
   programmatic preference (:func:`mmgpt.rlhf.shapes.write_shapes_reward_data`), trained on
   the right caption against each other one, with the answer's log-likelihood under its
   backbone as a term of the score (:class:`mmgpt.rlhf.reward_model.RewardModel`); it
   reports held-out pair accuracy per kind of corruption, how often its best caption of an
   image over all 216 captions is right, and **best-of-n accuracy over the policy's own
   samples** (n = 16 sampled captions of an image: is the one it scores highest right?)
   beside the oracle (is any right?) and a random pick — on the validation images this is
   the GATE of the RL runs (they start only if its pick beats a random one by ``--rm-gate``);
3. runs PPO, GRPO (adaptive β) and RLOO from the weak policy against that reward model, with
   the guards of :mod:`mmgpt.rlhf.guards` (a format penalty for captions off the grammar, a
   hard KL stop, the hacking detector, early stopping on exact match over the 200 validation
   images that keeps the best policy); GRPO and RLOO keep the ViT frozen (``--frozen-encoder``);
4. runs DPO from the same weak policy on 10,000 single-corruption pairs (chosen: the right
   caption): DPO with label smoothing 0.1, DPO + RPO (the chosen answers' NLL, weight 10) and,
   as the baseline any preference method is measured against, SFT on the chosen answers only;

and reports, for each policy, caption exact match and per-attribute accuracy on 200 held-out
images (greedy decoding; the same images for every seed), the reward model's mean score of
those captions and the KL to the weak SFT reference (sampled answers, nats per answer). Every
model sees the image: policies and reward model are MultimodalGPTs (ViT → projector → GPT).

    OMP_NUM_THREADS=1 python benchmarks/bench_rlhf.py --seed 0 --out runs/bench_rlhf/seed_0
    OMP_NUM_THREADS=1 python benchmarks/bench_rlhf.py --seeds 3 --out runs/bench_rlhf
    python benchmarks/bench_rlhf.py --aggregate --out runs/bench_rlhf   # the table of seed_*/
    python benchmarks/bench_rlhf.py --out /tmp/r --quick                # a smoke run (~1 min)

``--seed S`` changes every random choice of the run (SFT data and initialisation, the
preference data, the reward model's and each method's training), never the 200 evaluation
images. ``--seeds N`` runs seeds 0..N-1 one after the other into ``OUT/seed_S`` (or start one
process per seed with ``--seed S --out OUT/seed_S``) and then aggregates; ``--aggregate``
writes ``OUT/summary.json`` and prints the mean ± std table over ``OUT/seed_*/results.json``
with the bar each method is held to. Figures: docs/rlhf.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmgpt.checkpoint import checkpoint_name
from mmgpt.config import WEIGHTS_NAME
from mmgpt.data.preference import PreferenceDataset
from mmgpt.data.shapes import POSITIONS, SIZES, ShapesWorld, caption, parse_caption
from mmgpt.eval.caption import attribute_accuracy
from mmgpt.eval.metrics import exact_match
from mmgpt.files import load_tensors
from mmgpt.generation import GenerationConfig
from mmgpt.multimodal import MultimodalGPT
from mmgpt.objectives.dpo import DPOObjective
from mmgpt.objectives.reward import RewardObjective
from mmgpt.rlhf.data import PreferenceCollator, as_prompt
from mmgpt.rlhf.group_trainer import GroupTrainer, GRPOConfig, RLOOConfig
from mmgpt.rlhf.ppo import PPOConfig
from mmgpt.rlhf.ppo_trainer import PPOTrainer
from mmgpt.rlhf.reward_model import RewardModel
from mmgpt.rlhf.rollout import generate_responses, response_forward
from mmgpt.rlhf.shapes import caption_errors, write_shapes_preferences, write_shapes_reward_data
from mmgpt.trainer import Trainer
from mmgpt.weights import load_model_state

# one shape per image, three kinds and four colours (two sizes, nine positions): a world a
# 0.2M-parameter model learns on a CPU in minutes; 216 captions, 1/216 by chance
WORLD: dict[str, Any] = dict(
    image_size=48,
    max_shapes=1,
    kinds=("circle", "square", "triangle"),
    colors=("red", "green", "blue", "yellow"),
)
# 48×48 images in 16×16 patches: one image token per cell of the 3×3 grid
ENCODER = {"name": "vit_tiny_custom", "img_size": 48, "patch_size": 16}
# data seeds of seed 0; seed S adds 1000·S to each, except "eval" (the same test images)
SEEDS = {"sft": 0, "pairs": 10, "pairs_eval": 11, "prompts": 12, "rm": 14, "val": 113}
EVAL_SEED = 13
# the tokenizer learns from the first pairs only: they already hold the whole vocabulary, and
# the tokenizer (hence the SFT run) then does not depend on --pairs
TOKENIZER_PAIRS = 3000
# the rows of the table, in order; "sft" is the weak policy every method starts from
METHODS = ("ppo", "grpo", "rloo", "dpo", "dpo_rpo", "dpo_rpo_ranked", "nll_chosen")
LABELS = {
    "sft": "weak SFT (checkpoint chosen by validation exact match)",
    "ppo": "PPO",
    "grpo": "GRPO",
    "rloo": "RLOO",
    "dpo": "DPO (β 0.5, label smoothing 0.1)",
    "dpo_rpo": "DPO + RPO (β 0.1, NLL weight 10)",
    "dpo_rpo_ranked": "DPO + RPO on the RM's ranked data (right vs the rest)",
    "nll_chosen": "SFT on the chosen answers only",
    "sft_final": "(the end of the SFT run, the RM's start: for scale)",
}
PREFERENCE_METHODS = ("ppo", "grpo", "rloo", "dpo", "dpo_rpo", "dpo_rpo_ranked")
ATTRIBUTES = ("shape", "color", "size", "position", "count")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet_config(seed: int, **config: Any) -> dict[str, Any]:
    base = dict(
        progress=False,
        tensorboard=False,
        save_every=0,
        eval_every=0,
        log_every=25,
        seed=seed,
        betas=(0.9, 0.99),
        weight_decay=0.05,
    )
    return {**base, **config}


# -- evaluation --------------------------------------------------------------------------
@torch.no_grad()
def caption_eval(
    policy: MultimodalGPT, eval_world: ShapesWorld, reward_model: RewardModel | None
) -> dict[str, Any]:
    """Greedy captions of the held-out images: exact match, attributes, mean reward."""
    samples = [eval_world[i] for i in range(len(eval_world))]
    prompts = [as_prompt(s) for s in samples]
    answers: list[str] = []
    for start in range(0, len(prompts), 100):
        chunk = prompts[start : start + 100]
        _, texts, _ = generate_responses(
            policy, chunk, GenerationConfig(max_new_tokens=24, do_sample=False)
        )
        answers += texts
    references = [s.meta["caption"] for s in samples]
    result: dict[str, Any] = {
        "exact_match": exact_match(answers, references),
        "attributes": attribute_accuracy(answers, [s.meta["scene"] for s in samples]),
        "well_formed": sum(_well_formed(a) for a in answers) / len(answers),
        "examples": [[r, a] for r, a in zip(references[:4], answers[:4])],
    }
    if reward_model is not None:
        scores = reward_model.score(
            [p.conversation for p in prompts], answers, [p.images for p in prompts]
        )
        result["reward"] = float(scores.mean())
    return result


def _well_formed(answer: str) -> bool:
    try:
        parse_caption(answer, strict=True)
    except ValueError:
        return False
    return True


@torch.no_grad()
def sampled_kl(
    policy: MultimodalGPT, reference: MultimodalGPT, eval_world: ShapesWorld, n: int = 200
) -> float:
    """Monte-Carlo KL(π ‖ π_ref): the mean of log π(y) − log π_ref(y) over answers y ~ π
    (temperature 1), in nats per answer."""
    prompts = [as_prompt(eval_world[i]) for i in range(min(n, len(eval_world)))]
    total = 0.0
    for start in range(0, len(prompts), 50):
        chunk = prompts[start : start + 50]
        batch, _, _ = generate_responses(
            policy, chunk, GenerationConfig(max_new_tokens=24, seed=1234 + start)
        )
        mine = response_forward(policy.eval(), batch).logprobs.sum(-1)
        theirs = response_forward(reference.eval(), batch).logprobs.sum(-1)
        total += float((mine - theirs).sum())
    return total / len(prompts)


@torch.no_grad()
def reward_best_caption_accuracy(
    reward_model: RewardModel, eval_world: ShapesWorld, n: int = 50
) -> dict[str, float]:
    """How often the reward model's highest-scored caption of an image is the right one:
    ``all`` over every caption of one shape (kind × colour × size × position, 216 of them),
    ``position`` over the nine positions with the rest right."""
    hits = {"all": 0, "position": 0}
    n = min(n, len(eval_world))
    for i in range(n):
        sample = eval_world[i]
        prompt = as_prompt(sample)
        truth = dict(sample.meta["scene"][0])
        grids = {
            "all": [
                {"shape": k, "color": c, "size": z, "position": q}
                for k in WORLD["kinds"]
                for c in WORLD["colors"]
                for z in SIZES
                for q in POSITIONS
            ],
            "position": [{"position": q} for q in POSITIONS],
        }
        for key, changes in grids.items():
            candidates = [caption([{**truth, **change}]) for change in changes]
            scores = reward_model.score(
                [prompt.conversation] * len(candidates),
                candidates,
                [prompt.images] * len(candidates),
                batch_size=256,
            )
            hits[key] += candidates[int(scores.argmax())] == sample.meta["caption"]
    return {key: value / n for key, value in hits.items()}


@torch.no_grad()
def reward_best_of_n(
    reward_model: RewardModel,
    policy: MultimodalGPT,
    eval_world: ShapesWorld,
    *,
    images: int = 100,
    n: int = 16,
) -> dict[str, float]:
    """Best-of-n over the policy's OWN samples: ``n`` captions of each held-out image sampled
    from ``policy`` (temperature 1); ``accuracy`` is how often the one the reward model scores
    highest is exactly right, ``oracle`` how often any of them is (the ceiling), ``random``
    the share of right samples (picking one at random), ``mean_errors`` the programmatic
    errors of the picked caption (:func:`caption_errors`) and ``mean_errors_random`` of a
    random one."""
    picked_right = any_right = right = 0
    picked_errors = errors = 0.0
    count = min(images, len(eval_world))
    for start in range(0, count, 25):
        indices = list(range(start, min(start + 25, count)))
        samples = [eval_world[i] for i in indices]
        prompts = [as_prompt(s) for s in samples for _ in range(n)]
        seeds = [7_000_003 + i * n + j for i in indices for j in range(n)]
        _, texts, _ = generate_responses(
            policy, prompts, GenerationConfig(max_new_tokens=24, seed=seeds)
        )
        scores = reward_model.score(
            [p.conversation for p in prompts], texts, [p.images for p in prompts], batch_size=256
        ).view(len(samples), n)
        for row, sample in enumerate(samples):
            answers = texts[row * n : (row + 1) * n]
            errs = [caption_errors(a, sample.meta["scene"]) for a in answers]
            best = int(scores[row].argmax())
            picked_right += errs[best] == 0
            any_right += min(errs) == 0
            right += sum(e == 0 for e in errs) / n
            picked_errors += errs[best]
            errors += sum(errs) / n
    return {
        "n": n,
        "accuracy": picked_right / count,
        "oracle": any_right / count,
        "random": right / count,
        "mean_errors": picked_errors / count,
        "mean_errors_random": errors / count,
    }


def reward_accuracy_by_corruption(
    reward_model: RewardModel, pairs: PreferenceDataset
) -> dict[str, float]:
    collate = PreferenceCollator(reward_model.processor())
    right: dict[str, list[bool]] = {}
    reward_model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            items = [pairs[i] for i in range(start, min(start + 64, len(pairs)))]
            scores = reward_model(collate(items).pairs)
            B = len(items)
            for item, ok in zip(items, (scores[:B] > scores[B:]).tolist()):
                right.setdefault(item.meta["corruption"], []).append(ok)
    out = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    out["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return out


# -- phases ------------------------------------------------------------------------------
def build_tokenizer(out: Path, pairs_file: Path) -> Any:
    from mmgpt_text import TextTokenizer

    path = out / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return TextTokenizer.from_file(path)
    lines = []
    for line in pairs_file.read_text().splitlines()[:TOKENIZER_PAIRS]:
        record = json.loads(line)
        for answer in (record["chosen"], record["rejected"]):
            lines.append(f"User: {record['prompt']}\nAssistant: {answer}\n")
    corpus = out / "tokenizer_corpus.txt"
    corpus.write_text("".join(lines))
    tokenizer = TextTokenizer.train([corpus], vocab_size=512, num_signal_tokens=0)
    tokenizer.save(path)
    return tokenizer


def right_vs_rest_pairs(ranked_file: Path, out_file: Path) -> Path:
    """Pairs (the right caption, each other response) of the reward model's ranked lists:
    DPO on the weak policy's own mistakes and the multi-attribute corruptions, with a chosen
    answer that is always right (so the RPO term trains on right captions only)."""
    lines = []
    for line in ranked_file.read_text().splitlines():
        record = json.loads(line)
        responses, ranking = record["responses"], record["ranking"]
        for answer, errors in zip(responses[1:], ranking[1:]):
            if ranking[0] == 0 and errors > 0:
                pair = {"prompt": record["prompt"], "image": record["image"]}
                lines.append(json.dumps({**pair, "chosen": responses[0], "rejected": answer}))
    out_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_file


def caption_em(prompts: Any, answers: Any) -> dict[str, float]:
    """The validation metric of the RL runs (early stopping, the hacking detector)."""
    return {"exact_match": exact_match(answers, [p.meta["caption"] for p in prompts])}


def well_formed_caption(prompt: Any, answer: str) -> bool:
    """The format guard of the RL runs: the caption follows the caption grammar."""
    return _well_formed(answer)


def guard_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        format_penalty=args.format_penalty,
        missing_eos_penalty=args.format_penalty,  # an answer cut off is malformed too
        kl_stop=args.kl_stop,
        early_stop_metric="exact_match" if args.early_stop else None,
        early_stop_patience=args.early_stop_patience,
        restore_best=True,
    )


def rl_train_config(args: argparse.Namespace, seed: int, rollouts: int, lr: float) -> dict:
    return quiet_config(
        seed,
        max_steps=rollouts,
        batch_size=args.rl_batch,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=0,
        log_every=1,
        eval_every=max(1, rollouts // args.rl_evals),
        eval_batches=0,  # every validation image: early stopping chooses on all of them
    )


def evaluate_reward_model(
    args: argparse.Namespace,
    results: dict[str, Any],
    reward_model: RewardModel,
    sft: MultimodalGPT,
    eval_world: ShapesWorld,
    val_world: ShapesWorld,
    eval_pairs: PreferenceDataset,
) -> None:
    """The reward model's pair, best-caption and best-of-n accuracy, the gate of the RL runs,
    and the weak policy's captions with their scores.

    The gate is best-of-16 over the weak policy's own samples of the VALIDATION images (the
    test images decide nothing): RL climbs toward the caption the reward model scores highest
    among what the policy says, so the RL runs start only when its pick is right at least
    ``--rm-gate`` more often than a random sample."""
    gate = reward_best_of_n(reward_model, sft, val_world, images=args.bon_images)
    gate["margin"] = args.rm_gate
    gate["passed"] = gate["accuracy"] >= gate["random"] + args.rm_gate
    results["reward_model"] = {
        "heldout_accuracy": reward_accuracy_by_corruption(reward_model, eval_pairs),
        "best_caption_accuracy": reward_best_caption_accuracy(
            reward_model, eval_world, args.rm_argmax_images
        ),
        "best_of_n": reward_best_of_n(reward_model, sft, eval_world, images=args.bon_images),
        "gate": gate,
        "normalization": reward_model.normalization,
    }
    results["sft"] = caption_eval(sft, eval_world, reward_model)
    log(f"weak SFT (step {results['weak_policy']['step']}): {results['sft']['exact_match']:.3f}")
    log(f"reward model: {json.dumps(results['reward_model'])}")


def parse_band(text: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` → (low, high): the weak policy's target band of exact match."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--weak-band: expected two numbers LOW,HIGH (e.g. 0.25,0.40), got {text!r}"
        ) from None
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"--weak-band: need 0 <= LOW <= HIGH <= 1, got {text!r}")
    return low, high


def choose_weak_checkpoint(
    model: MultimodalGPT,
    checkpoint_dir: Path,
    steps: list[int],
    val_world: ShapesWorld,
    band: tuple[float, float],
) -> dict[str, Any]:
    """The weak policy: the FIRST SFT checkpoint whose exact match on the validation images
    lies in ``band``; without one, the checkpoint closest to the band (the earliest of equals).
    Loads it into ``model``; returns the chosen step, its validation exact match and the
    curve of the checkpoints evaluated (evaluation stops at the first one in the band)."""
    low, high = band
    curve: list[list[float]] = []
    for step in steps:
        checkpoint = checkpoint_dir / checkpoint_name(step)
        load_model_state(model, load_tensors(checkpoint / WEIGHTS_NAME), checkpoint)
        em = caption_eval(model, val_world, None)["exact_match"]
        curve.append([step, em])
        log(f"SFT step {step}: validation exact match {em:.3f}")
        if low <= em <= high:
            break
    step, em = min(curve, key=lambda c: (max(low - c[1], c[1] - high, 0.0), c[0]))
    checkpoint = checkpoint_dir / checkpoint_name(int(step))
    load_model_state(model, load_tensors(checkpoint / WEIGHTS_NAME), checkpoint)
    return {"step": int(step), "val_exact_match": em, "band": list(band), "curve": curve}


def run_seed(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One seed of the whole pipeline into ``out``; returns (and writes) its results."""
    seed = args.seed
    seeds = {k: v + 1000 * seed for k, v in SEEDS.items()}
    out.mkdir(parents=True, exist_ok=True)
    phases = set(args.phases.split(","))
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": vars(args), "world": WORLD, "encoder": ENCODER}
    results_path = out / "results.json"
    if args.reuse and results_path.is_file():
        results = {**json.loads(results_path.read_text()), "settings": vars(args)}
    elif results_path.is_file():
        results_path.unlink()  # a fresh run: no rows of an earlier one merged in below

    def save_results() -> None:
        # merged into the file: with --reuse and --phases, two processes may share a seed's
        # directory (one for the RL runs, one for DPO), each adding its own rows
        results["wall_s"] = round(time.perf_counter() - started, 1)
        merged = json.loads(results_path.read_text()) if results_path.is_file() else {}
        merged.update(results)
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, results_path)

    # data: preference pairs (train / held-out), prompts and eval images are disjoint seeds
    pairs_file = out / "data" / "train" / "preferences.jsonl"
    if not pairs_file.is_file() or len(pairs_file.read_text().splitlines()) != args.pairs:
        shutil.rmtree(out / "data", ignore_errors=True)
        write_shapes_preferences(out / "data" / "train", args.pairs, seed=seeds["pairs"], **WORLD)
        write_shapes_preferences(
            out / "data" / "eval", max(args.pairs // 10, 40), seed=seeds["pairs_eval"], **WORLD
        )
    train_pairs = PreferenceDataset(pairs_file)
    eval_pairs = PreferenceDataset(out / "data" / "eval" / "preferences.jsonl")
    eval_world = ShapesWorld(size=args.eval_images, seed=EVAL_SEED, task="caption", **WORLD)
    # the validation images (another seed than the test images): they choose the weak policy,
    # gate the reward model and drive the RL runs' early stopping
    val_world = ShapesWorld(size=args.val_images, seed=seeds["val"], task="caption", **WORLD)
    tokenizer = build_tokenizer(out, pairs_file)
    log(f"seed {seed}: {len(train_pairs)} train pairs, {len(eval_pairs)} held-out pairs")

    # 1. SFT: one caption run; the policy starts from an EARLY checkpoint (the first whose
    #    validation exact match is in --weak-band, or --weak-step), the reward model from its end
    weak_dir, final_dir = out / "sft" / "weak", out / "sft" / "model"
    if not (args.reuse and weak_dir.is_dir() and final_dir.is_dir()):
        shutil.rmtree(out / "sft", ignore_errors=True)
        torch.manual_seed(seed)
        model = MultimodalGPT.build(
            "gpt-nano", tokenizer, block_size=64, dropout=0.0, encoder_kwargs=ENCODER
        )
        world = ShapesWorld(size=100_000, seed=seeds["sft"], task="caption", **WORLD)
        t = time.perf_counter()
        trainer = Trainer(
            model,
            "sft",
            world,
            quiet_config(
                seed,
                max_steps=args.sft_steps,
                batch_size=32,
                lr=2e-3,
                min_lr=2e-3,  # constant after warmup: the checkpoints are points of one run
                warmup_steps=100,
                save_every=args.weak_step or args.weak_every,
                keep_last=args.sft_steps // (args.weak_step or args.weak_every) + 1,
            ),
            collate_fn=model.processor(),
            out_dir=out / "sft",
        )
        trainer.fit()
        results["sft_train_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        if args.weak_step:
            steps = [args.weak_step]
        else:
            steps = list(range(args.weak_every, args.sft_steps, args.weak_every))
        if not steps:
            raise SystemExit(
                f"--weak-every {args.weak_every}: no checkpoint before step "
                f"{args.sft_steps} (--sft-steps)"
            )
        results["weak_policy"] = choose_weak_checkpoint(
            model, trainer.checkpoint_dir, steps, val_world, args.weak_band
        )
        results["weak_choice_s"] = round(time.perf_counter() - t, 1)
        model.save_pretrained(weak_dir)
        shutil.rmtree(trainer.checkpoint_dir)  # 20-odd checkpoints with optimizer states
    sft = MultimodalGPT.from_pretrained(weak_dir)
    results["sft_final"] = caption_eval(MultimodalGPT.from_pretrained(final_dir), eval_world, None)
    log(f"SFT step {args.sft_steps}: {results['sft_final']['exact_match']:.3f}")

    # 2. reward model on ranked lists: right caption, multi-attribute corruptions and the weak
    #    policy's own samples, ranked by the programmatic preference
    rm_dir = out / "rm" / "model"
    if "rm" in phases and not (args.reuse and rm_dir.is_dir()):
        if not args.reuse:  # a fresh run: no checkpoints of an earlier reward model
            shutil.rmtree(out / "rm", ignore_errors=True)
        torch.manual_seed(seed)
        t = time.perf_counter()
        rm_data = out / "data" / "rm" / "preferences.jsonl"
        if not (args.reuse and rm_data.is_file()):
            rm_data = write_shapes_reward_data(
                out / "data" / "rm",
                args.rm_images,
                negatives=args.rm_negatives,
                per_attribute=args.rm_per_attribute,
                policy=sft if args.rm_policy_samples else None,
                policy_samples=max(args.rm_policy_samples, 1),
                sample_seed=seeds["rm"],
                seed=seeds["rm"],
                **WORLD,
            )
        if args.rm_pairs == "right":
            # every pair has the right caption as the chosen one: all ordered pairs of a list
            # are mostly two wrong captions, and they drown the pairs that teach what is right
            rm_data = right_vs_rest_pairs(rm_data, rm_data.with_name("right.jsonl"))
        rm_pairs = PreferenceDataset(rm_data)
        results["rm_data"] = {"images": args.rm_images, "pairs": len(rm_pairs)}
        results["rm_data_s"] = round(time.perf_counter() - t, 1)
        log(f"reward-model data: {len(rm_pairs)} pairs from {args.rm_images} ranked lists")
        t = time.perf_counter()
        trainer = RewardObjective().build_trainer(
            RewardModel(
                MultimodalGPT.from_pretrained(final_dir),
                likelihood_weight=args.rm_likelihood or None,
            ),
            rm_pairs,
            quiet_config(
                seed,
                max_steps=args.rm_steps,
                batch_size=args.rm_batch,
                lr=args.rm_lr,
                min_lr=args.rm_lr / 10,
                warmup_steps=20,
            ),
            eval_data=eval_pairs,
            out_dir=out / "rm",
        )
        trainer.fit(resume=args.reuse and (out / "rm" / "checkpoints").is_dir())
        results["rm_train_s"] = round(time.perf_counter() - t, 1)
    reward_model = RewardModel.from_pretrained(rm_dir)
    if not (args.reuse and "reward_model" in results and "sft" in results):
        evaluate_reward_model(args, results, reward_model, sft, eval_world, val_world, eval_pairs)
        save_results()
    gate = results["reward_model"]["gate"]
    rl_phases = phases & {"ppo", "grpo", "rloo"}
    if rl_phases and not gate["passed"]:
        log(
            f"reward-model gate: best-of-{gate['n']} {gate['accuracy']:.2f} < random pick "
            f"{gate['random']:.2f} + {gate['margin']:.2f} on the validation images; "
            f"skipping {sorted(rl_phases)}"
        )
        results["rl_skipped"] = "reward-model gate"
        phases -= rl_phases

    def finish(name: str, trainer: Any, t: float) -> None:
        results[f"{name}_train_s"] = round(time.perf_counter() - t, 1)
        tuned = MultimodalGPT.from_pretrained(out / name / "model")
        results[name] = caption_eval(tuned, eval_world, reward_model)
        results[name]["kl_to_sft"] = sampled_kl(tuned, sft, eval_world, n=args.kl_images)
        for key in ("kl_controller", "early_stopping", "hacking_detector"):
            if hasattr(trainer, key) and getattr(trainer, key) is not None:
                results[name][key] = getattr(trainer, key).state_dict()
        results[name]["stopped_early"] = getattr(trainer, "stopped_early", None)
        row = results[name]
        log(f"{name}: exact match {row['exact_match']:.3f}, reward {row['reward']:.2f}")
        save_results()

    # 3. PPO, GRPO and RLOO from the weak SFT model against the reward model
    prompts = ShapesWorld(size=20_000, seed=seeds["prompts"], task="caption", **WORLD)
    sampling = dict(max_new_tokens=24, samples_per_prompt=args.rl_samples)

    def policy_start(method: str) -> MultimodalGPT:
        """The weak policy for an RL run, its ViT frozen for the methods in --frozen-encoder
        (GRPO and RLOO, as their recipes' train.train_encoder=false): GRPO's sequence-level
        advantage through the vision tower wrecked its colour features (seed 1: colour 0.69
        -> 0.535 trained, even at 0.1x the lr; 0.75 frozen). PPO, whose per-token value
        baseline trained it without harm, keeps training it (frozen, one seed's run crossed
        the KL stop after 12 rollouts)."""
        policy = copy.deepcopy(sft)
        if method in args.frozen_encoder.split(","):
            policy.freeze("encoder")
        return policy

    rl_runs: dict[str, Any] = {
        "ppo": lambda: PPOTrainer(
            policy_start("ppo"),
            reward_model,
            prompts,
            rl_train_config(args, seed, args.ppo_rollouts, args.ppo_lr),
            PPOConfig(
                **sampling,
                ppo_epochs=args.ppo_epochs,
                minibatch_size=args.ppo_minibatch,
                init_kl_coef=args.ppo_init_kl,
                target_kl=args.target_kl,
                kl_horizon=args.kl_horizon,
                vf_coef=0.1,
                whiten_rewards=args.whiten_rewards,
                reward_clip=args.reward_clip,
                **guard_settings(args),
            ),
            eval_prompts=val_world,
            out_dir=out / "ppo",
            eval_fn=caption_em,
            format_fn=well_formed_caption,
        ),
        "grpo": lambda: GroupTrainer(
            policy_start("grpo"),
            reward_model,
            prompts,
            rl_train_config(args, seed, args.group_rollouts, args.grpo_lr),
            GRPOConfig(
                **sampling,
                epochs=2,
                minibatch_size=args.ppo_minibatch,
                beta=args.grpo_beta,
                target_kl=args.grpo_target_kl or None,
                kl_horizon=args.kl_horizon,
                scale_rewards=args.grpo_scale_rewards,
                clip_range_high=args.grpo_clip_high or None,
                entropy_coef=args.grpo_entropy,
                reward_clip=args.reward_clip,
                **guard_settings(args),
            ),
            eval_prompts=val_world,
            out_dir=out / "grpo",
            eval_fn=caption_em,
            format_fn=well_formed_caption,
        ),
        "rloo": lambda: GroupTrainer(
            policy_start("rloo"),
            reward_model,
            prompts,
            rl_train_config(args, seed, args.group_rollouts, args.rloo_lr),
            RLOOConfig(
                **sampling,
                epochs=1,
                minibatch_size=args.ppo_minibatch,
                kl_coef=args.rloo_kl,
                reward_clip=args.reward_clip,
                **guard_settings(args),
            ),
            eval_prompts=val_world,
            out_dir=out / "rloo",
            eval_fn=caption_em,
            format_fn=well_formed_caption,
        ),
    }
    for name, build in rl_runs.items():
        if name not in phases:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        torch.manual_seed(seed)
        t = time.perf_counter()
        trainer = build()
        trainer.fit()
        finish(name, trainer, t)

    # 4. DPO from the weak SFT model on the single-corruption pairs: DPO (conservative: label
    #    smoothing), DPO with the RPO term (the chosen answers' NLL) and that NLL term alone
    #    (SFT on the chosen answers: the baseline)
    variants: dict[str, dict[str, Any]] = {
        "dpo": dict(
            beta=args.plain_dpo_beta,
            label_smoothing=args.plain_dpo_smoothing,
            steps=args.dpo_steps,
            lr=args.plain_dpo_lr,
        ),
        "dpo_rpo": dict(
            beta=args.dpo_beta, sft_weight=args.dpo_sft_weight, steps=args.dpo_steps, lr=args.dpo_lr
        ),
        "dpo_rpo_ranked": dict(
            beta=args.dpo_beta, sft_weight=args.dpo_sft_weight, steps=args.dpo_steps, lr=args.dpo_lr
        ),
        "nll_chosen": dict(steps=args.dpo_steps, lr=args.dpo_lr),
    }
    ranked_file = out / "data" / "rm" / "preferences.jsonl"
    for name, variant in variants.items():
        if name not in phases:
            continue
        variant = dict(variant)
        steps, lr = variant.pop("steps"), variant.pop("lr")
        shutil.rmtree(out / name, ignore_errors=True)
        torch.manual_seed(seed)
        t = time.perf_counter()
        config = quiet_config(
            seed,
            max_steps=steps,
            batch_size=16,
            lr=lr,
            min_lr=lr / 10,
            warmup_steps=20,
        )
        model = copy.deepcopy(sft)  # every part trains, as in the dpo recipe
        if name == "nll_chosen":
            chosen = [train_pairs[i].samples()[0] for i in range(len(train_pairs))]
            trainer = Trainer(
                model, "sft", chosen, config, collate_fn=model.processor(), out_dir=out / name
            )
        else:
            data = train_pairs
            if name == "dpo_rpo_ranked":
                pairs_path = right_vs_rest_pairs(ranked_file, ranked_file.with_name("right.jsonl"))
                data = PreferenceDataset(pairs_path)
                results["dpo_rpo_ranked_pairs"] = len(data)
            objective = DPOObjective(reference_batch_size=64, **variant)
            trainer = objective.build_trainer(
                model, data, config, eval_data=eval_pairs, out_dir=out / name
            )
        trainer.fit()
        finish(name, trainer, t)
        results[name]["settings"] = {"steps": steps, "lr": lr, **variant}
        save_results()

    save_results()
    log(f"seed {seed} done in {results['wall_s']} s")
    return results


# -- the table over seeds ----------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]  # e.g. no reward score of sft_final
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    mean, std = _mean_std([v * scale for v in values])
    if math.isnan(mean):
        return "—"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def aggregate(out: Path, min_gain: float = 15.0, max_drop: float = 2.0, gap: float = 5.0) -> dict:
    """Mean ± std over ``out/seed_*/results.json``, and whether each method meets the bar:
    ≥ ``min_gain`` points of exact match over the weak policy on every seed, no attribute
    falling by more than ``max_drop`` points on any seed, and the best preference method
    within ``gap`` points of SFT on the chosen answers (or above)."""
    runs = []
    for path in sorted(out.glob("seed_*/results.json")):
        data = json.loads(path.read_text())
        if "sft" in data:
            for name in ("ppo", "grpo", "rloo"):
                if name in data and (path.parent / name / "metrics.jsonl").is_file():
                    data[name]["training_log"] = rl_log_summary(path.parent / name)
            runs.append(data)
    if not runs:
        raise SystemExit(f"--aggregate: no {out}/seed_*/results.json with results")
    seeds = [r["settings"]["seed"] for r in runs]
    rows: dict[str, Any] = {}
    for name in ("sft", *METHODS, "sft_final"):
        have = [r for r in runs if name in r]
        if not have:
            continue
        em = [r[name]["exact_match"] for r in have]
        delta = [100 * (r[name]["exact_match"] - r["sft"]["exact_match"]) for r in have]
        drops = [
            max(100 * (r["sft"]["attributes"][a] - r[name]["attributes"][a]) for a in ATTRIBUTES)
            for r in have
        ]
        row: dict[str, Any] = {
            "seeds": [r["settings"]["seed"] for r in have],
            "exact_match": em,
            "delta_points": delta,
            "worst_attribute_drop_points": drops,
            "attributes": {a: [r[name]["attributes"][a] for r in have] for a in ATTRIBUTES},
            "reward": [r[name].get("reward", math.nan) for r in have],
            "kl_to_sft": [r[name].get("kl_to_sft", math.nan) for r in have],
            "train_s": [r.get(f"{name}_train_s", math.nan) for r in have],
        }
        if all("training_log" in r[name] for r in have):
            logs = [r[name]["training_log"] for r in have]
            row["training_log"] = {key: [g[key] for g in logs] for key in logs[0]}
        # a method is judged only when it ran on every seed
        if name in PREFERENCE_METHODS and len(have) == len(runs):
            row["meets_gain"] = min(delta) >= min_gain
            row["meets_attributes"] = max(drops) <= max_drop
        rows[name] = row
    best = None
    complete = [
        m
        for m in (*PREFERENCE_METHODS, "nll_chosen")
        if len(rows.get(m, {}).get("seeds", [])) == len(runs)
    ]
    if "nll_chosen" in complete:
        baseline = statistics.fmean(rows["nll_chosen"]["exact_match"])
        candidates = [m for m in complete if m != "nll_chosen"]
        if candidates:
            best = max(candidates, key=lambda m: statistics.fmean(rows[m]["exact_match"]))
            best_gap = 100 * (statistics.fmean(rows[best]["exact_match"]) - baseline)
            rows[best]["gap_to_sft_on_chosen_points"] = best_gap
    rm = {
        key: [r["reward_model"][key] for r in runs if key in r["reward_model"]]
        for key in ("heldout_accuracy", "best_caption_accuracy", "best_of_n", "gate")
    }
    weak = [r["weak_policy"] for r in runs if "weak_policy" in r]
    summary = {
        "seeds": seeds,
        "rows": rows,
        "best_preference_method": best,
        "reward_model": rm,
        "weak_policy": weak,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown_tables(summary))
    return summary


def rl_log_summary(run_dir: Path) -> dict[str, Any]:
    """What an RL run's metrics.jsonl says about KL control and reward hacking: the mean KL
    to the reference of the last 10 rollouts (nats per answer), the last β (PPO), the
    evaluations the detector flagged, the restored best step and why the run stopped early."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train" and "kl" in r]
    evals = [r for r in records if r.get("split") == "eval" and "reward" in r]
    last = [r for r in records if "restored_best_step" in r]
    return {
        "kl_last10": statistics.fmean(r["kl"] for r in train[-10:]) if train else math.nan,
        "beta_last": train[-1].get("beta", math.nan) if train else math.nan,
        "rollouts": len(train),
        "evaluations": len(evals),
        "hacking_warnings": sum(r.get("hacking_warning", 0.0) for r in evals),
        "restored_best_step": last[-1]["restored_best_step"] if last else None,
        "stopped_early": last[-1].get("stopped_early") if last else None,
    }


def markdown_tables(summary: dict[str, Any]) -> str:
    rows, rm = summary["rows"], summary["reward_model"]
    lines = [
        f"seeds {summary['seeds']}: mean ± std over seeds",
        "",
        "| policy | exact match | Δ vs weak (points) | min Δ | worst attribute drop | shape "
        "| colour | position | RM score | KL to weak SFT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        weak = name == "sft"
        lines.append(
            "| "
            + " | ".join(
                [
                    LABELS[name],
                    _fmt(row["exact_match"]),
                    "—" if weak else _fmt(row["delta_points"], digits=1, signed=True),
                    "—" if weak else f"{min(row['delta_points']):+.1f}",
                    "—" if weak else f"{max(row['worst_attribute_drop_points']):.1f}",
                    _fmt(row["attributes"]["shape"]),
                    _fmt(row["attributes"]["color"]),
                    _fmt(row["attributes"]["position"]),
                    _fmt(row["reward"], digits=2),
                    "—" if weak else _fmt(row["kl_to_sft"], digits=2),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "| policy | " + " | ".join(f"seed {s}: exact match (Δ)" for s in summary["seeds"]) + " |",
        "|---|" + "---|" * len(summary["seeds"]),
    ]
    for name, row in rows.items():
        cells = {
            seed: f"{em:.3f}" + ("" if name == "sft" else f" ({d:+.1f})")
            for seed, em, d in zip(row["seeds"], row["exact_match"], row["delta_points"])
        }
        lines.append(
            f"| {LABELS[name]} | "
            + " | ".join(cells.get(seed, "—") for seed in summary["seeds"])
            + " |"
        )
    if summary.get("weak_policy"):
        lines += [
            "",
            "weak policy (SFT step, validation exact match) per seed: "
            + ", ".join(
                f"{w['step']} ({w['val_exact_match']:.3f})" for w in summary["weak_policy"]
            ),
        ]
    bon = rm["best_of_n"]
    lines += [
        "",
        "| images | RM pair accuracy (held-out, single corruption) | colour pairs "
        "| best caption of 216 | best-of-16 of the weak policy's samples | oracle (any right) "
        "| random pick |",
        "|---|---|---|---|---|---|---|",
        "| test | "
        + " | ".join(
            [
                _fmt([a["all"] for a in rm["heldout_accuracy"]]),
                _fmt([a.get("color", math.nan) for a in rm["heldout_accuracy"]]),
                _fmt([a["all"] for a in rm["best_caption_accuracy"]], digits=2),
                _fmt([b["accuracy"] for b in bon], digits=2),
                _fmt([b["oracle"] for b in bon], digits=2),
                _fmt([b["random"] for b in bon], digits=2),
            ]
        )
        + " |",
    ]
    if rm.get("gate"):
        gate = rm["gate"]
        lines.append(
            "| validation (the gate of the RL runs) | — | — | — | "
            + " | ".join(
                _fmt([g[key] for g in gate], digits=2) for key in ("accuracy", "oracle", "random")
            )
            + " |"
        )
        lines += [
            "",
            "reward-model gate passed on seeds: "
            + ", ".join(f"{s}: {g['passed']}" for s, g in zip(summary["seeds"], gate)),
        ]
    rl = [(n, r["training_log"]) for n, r in rows.items() if "training_log" in r]
    if rl:
        lines += [
            "",
            "| RL run | KL of the last 10 rollouts | final β | hacking warnings "
            "| restored best step (of the rollouts) |",
            "|---|---|---|---|---|",
        ]
        for name, g in rl:
            beta = "—" if all(math.isnan(b) for b in g["beta_last"]) else _fmt(g["beta_last"])
            steps = ", ".join(f"{b}/{n}" for b, n in zip(g["restored_best_step"], g["rollouts"]))
            lines.append(
                f"| {LABELS[name]} | {_fmt(g['kl_last10'], digits=2)} | {beta} "
                f"| {sum(g['hacking_warnings']):.0f} of {sum(g['evaluations'])} | {steps} |"
            )
    verdicts = []
    for name, row in rows.items():
        if name in PREFERENCE_METHODS and "meets_gain" not in row:
            verdicts.append(f"{name}: not judged, ran on seeds {row['seeds']} only")
        if "meets_gain" in row:
            verdicts.append(
                f"{name}: ≥15 points on every seed: {row['meets_gain']} (min "
                f"{min(row['delta_points']):+.1f}); no attribute down > 2 points: "
                f"{row['meets_attributes']} (worst {max(row['worst_attribute_drop_points']):.1f})"
            )
    best = summary.get("best_preference_method")
    if best is not None and "gap_to_sft_on_chosen_points" in rows[best]:
        verdicts.append(
            f"best preference method {best}: {rows[best]['gap_to_sft_on_chosen_points']:+.1f} "
            "points vs SFT on the chosen answers"
        )
    return "\n".join([*lines, "", *verdicts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_rlhf")
    parser.add_argument("--seed", type=int, default=0, help="the seed of one run")
    parser.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1 into OUT/seed_S")
    parser.add_argument("--aggregate", action="store_true", help="only the table of OUT/seed_*")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run")
    parser.add_argument(
        "--reuse", action="store_true", help="keep SFT, RM data and RM (or resume it) in --out"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=10000, help="DPO pairs")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=200, help="validation images")
    parser.add_argument(
        "--sft-steps", type=int, default=1000, help="the SFT run (its end: the RM's start)"
    )
    parser.add_argument(
        "--weak-band",
        type=parse_band,
        default=(0.25, 0.40),
        help="LOW,HIGH: the weak policy is the first SFT checkpoint with validation exact "
        "match in this band (else the closest)",
    )
    parser.add_argument("--weak-every", type=int, default=25, help="SFT steps per checkpoint")
    parser.add_argument(
        "--weak-step", type=int, default=0, help="a fixed SFT step as the policy (0: --weak-band)"
    )
    parser.add_argument("--rm-images", type=int, default=1000, help="ranked lists for the RM")
    parser.add_argument("--rm-negatives", type=int, default=6, help="corrupted captions/image")
    parser.add_argument(
        "--rm-per-attribute", type=int, default=2, help="captions wrong in one attribute only"
    )
    parser.add_argument("--rm-policy-samples", type=int, default=8, help="0: none (off-policy)")
    parser.add_argument(
        "--rm-pairs",
        choices=("right", "all"),
        default="right",
        help="RM pairs of each ranked list: the right caption vs each other one, or every "
        "ordered pair",
    )
    parser.add_argument("--rm-steps", type=int, default=600)
    parser.add_argument("--rm-batch", type=int, default=32, help="pairs per reward-model step")
    parser.add_argument("--rm-lr", type=float, default=3e-4)
    parser.add_argument(
        "--rm-likelihood",
        type=float,
        default=1.0,
        help="start of the RM's weight on the answer's log-likelihood (0: last-token head only)",
    )
    parser.add_argument("--rm-argmax-images", type=int, default=20)
    parser.add_argument("--bon-images", type=int, default=100, help="best-of-16 images")
    parser.add_argument(
        "--rm-gate",
        type=float,
        default=0.4,
        help="RL runs only if the RM's best-of-16 pick beats a random one by this (-1: off)",
    )
    parser.add_argument("--kl-images", type=int, default=100, help="images for the KL")
    parser.add_argument("--rl-batch", type=int, default=32, help="prompts per rollout")
    parser.add_argument("--rl-samples", type=int, default=4, help="answers per prompt")
    parser.add_argument("--rl-evals", type=int, default=5, help="validations per RL run")
    parser.add_argument("--ppo-rollouts", type=int, default=100)
    parser.add_argument("--group-rollouts", type=int, default=100, help="GRPO and RLOO")
    parser.add_argument("--ppo-lr", type=float, default=5e-4)
    parser.add_argument("--grpo-lr", type=float, default=1e-3)
    parser.add_argument("--rloo-lr", type=float, default=1e-3)
    parser.add_argument("--ppo-init-kl", type=float, default=0.1)
    parser.add_argument("--ppo-minibatch", type=int, default=64)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--target-kl", type=float, default=4.0)
    parser.add_argument("--kl-horizon", type=int, default=640, help="answers (β reacts faster)")
    parser.add_argument("--kl-stop", type=float, default=12.0, help="hard KL stop, nats/answer")
    parser.add_argument("--whiten-rewards", action="store_true")
    parser.add_argument("--reward-clip", type=float, default=5.0)
    parser.add_argument("--format-penalty", type=float, default=1.0)
    parser.add_argument("--no-early-stop", dest="early_stop", action="store_false")
    parser.add_argument("--early-stop-patience", type=int, default=0, help="0: keep training")
    parser.add_argument("--grpo-beta", type=float, default=0.04, help="(the start, adaptive)")
    parser.add_argument(
        "--grpo-target-kl", type=float, default=4.0, help="GRPO's adaptive β (0: fixed β)"
    )
    parser.add_argument(
        "--grpo-scale-rewards",
        default="group",
        choices=("group", "batch", "none"),
        help="the std GRPO's advantages are divided by",
    )
    parser.add_argument("--grpo-clip-high", type=float, default=0.0, help="0: the clip range")
    parser.add_argument("--grpo-entropy", type=float, default=0.0, help="entropy bonus")
    parser.add_argument(
        "--frozen-encoder",
        default="grpo,rloo",
        help="the RL methods whose ViT stays frozen (comma-separated; '' for none)",
    )
    parser.add_argument("--rloo-kl", type=float, default=0.05)
    parser.add_argument("--dpo-steps", type=int, default=300)
    parser.add_argument("--dpo-lr", type=float, default=5e-4, help="DPO+RPO (and NLL only)")
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO+RPO")
    parser.add_argument("--dpo-sft-weight", type=float, default=10.0, help="DPO+RPO")
    parser.add_argument("--plain-dpo-lr", type=float, default=1e-4)
    parser.add_argument("--plain-dpo-beta", type=float, default=0.5)
    parser.add_argument("--plain-dpo-smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument(
        "--phases", default="rm,ppo,grpo,rloo,dpo,dpo_rpo,dpo_rpo_ranked,nll_chosen"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.aggregate:
        aggregate(out)
        return 0
    if args.quick:
        args.pairs, args.eval_images = 200, 40
        args.sft_steps, args.weak_every, args.val_images = 20, 5, 20
        if args.rm_gate == parser.get_default("rm_gate"):
            args.rm_gate = -1.0  # a 20-step reward model passes no gate; the smoke run runs all
        args.rm_images, args.rm_steps, args.rm_argmax_images = 20, 10, 3
        args.bon_images, args.kl_images = 4, 8
        args.ppo_rollouts = args.group_rollouts = 2
        args.rl_batch, args.dpo_steps, args.rl_evals = 4, 5, 2
    torch.set_num_threads(args.threads)
    if args.seeds:
        for seed in range(args.seeds):
            run_seed(argparse.Namespace(**{**vars(args), "seed": seed}), out / f"seed_{seed}")
        aggregate(out)
    else:
        run_seed(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
