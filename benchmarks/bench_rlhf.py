"""RLHF on the shapes world: a weak captioner → reward model → PPO and, separately, DPO.

The preference is programmatic: for each image the chosen caption is right in every attribute,
the rejected one is wrong in one (a colour, a shape, a position, or the number of shapes;
:mod:`mmgpt.rlhf.shapes`). The run

1. trains one caption SFT run (600 steps) and takes its EARLY checkpoint (step 400) as the
   deliberately weak policy (low exact match);
2. trains a reward model on 10,000 preference pairs, starting from the end of that SFT run
   (``--rm-from weak`` starts it from the weak checkpoint instead), and measures its held-out
   pair accuracy per kind of corruption and how often its BEST caption of an image (the
   argmax over every caption of one shape) is the right one — the optimum PPO climbs toward;
3. runs PPO from the weak policy against that reward model (KL-controlled toward the weak
   policy, several sampled answers per image);
4. runs DPO from the same weak policy on the same pairs: plain DPO (the sigmoid loss with
   label smoothing 0.1, i.e. conservative DPO; and without the smoothing), DPO with the RPO
   term (the chosen answers' NLL, ``--dpo-sft-weight``) and, to show what that term alone
   does, the NLL of the chosen answers without any DPO term;

and reports, for the weak policy and each tuned one, caption exact match and per-attribute
accuracy on 300 held-out images (greedy decoding), the reward model's mean score of those
captions, and the KL to the weak SFT reference (sampled answers, nats per answer). Every model
sees the image: policies and reward model are MultimodalGPTs (ViT → projector → GPT).

    OMP_NUM_THREADS=1 python benchmarks/bench_rlhf.py --out runs/bench_rlhf  # ~8 min, 1 thread
    python benchmarks/bench_rlhf.py --out /tmp/r --quick            # a smoke run (~1 min)

Results go to ``OUT/results.json`` (and each phase's run directory); ``--reuse`` keeps the SFT
and reward-model phases already done in ``--out``. Figures of a run: docs/rlhf.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmgpt.checkpoint import checkpoint_name
from mmgpt.config import WEIGHTS_NAME
from mmgpt.data.preference import PreferenceDataset
from mmgpt.data.shapes import POSITIONS, SIZES, ShapesWorld, caption
from mmgpt.eval.caption import attribute_accuracy
from mmgpt.eval.metrics import exact_match
from mmgpt.files import load_tensors
from mmgpt.generation import GenerationConfig
from mmgpt.multimodal import MultimodalGPT
from mmgpt.objectives.dpo import DPOObjective
from mmgpt.objectives.reward import RewardObjective
from mmgpt.rlhf.data import PreferenceCollator, as_prompt
from mmgpt.rlhf.ppo_trainer import PPOTrainer
from mmgpt.rlhf.reward_model import RewardModel
from mmgpt.rlhf.rollout import generate_responses, response_forward
from mmgpt.rlhf.shapes import write_shapes_preferences
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
SEEDS = {"sft": 0, "pairs": 10, "pairs_eval": 11, "prompts": 12, "eval": 13}
# the tokenizer learns from the first pairs only: they already hold the whole vocabulary, and
# the tokenizer (hence the SFT run) then does not depend on --pairs
TOKENIZER_PAIRS = 3000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet_config(**config: Any) -> dict[str, Any]:
    base = dict(
        progress=False,
        tensorboard=False,
        save_every=0,
        eval_every=0,
        log_every=25,
        seed=0,
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
        "examples": [[r, a] for r, a in zip(references[:4], answers[:4])],
    }
    if reward_model is not None:
        scores = reward_model.score(
            [p.conversation for p in prompts], answers, [p.images for p in prompts]
        )
        result["reward"] = float(scores.mean())
    return result


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
    reward_model: RewardModel, eval_world: ShapesWorld, n: int = 100
) -> dict[str, float]:
    """How often the reward model's highest-scored caption of an image is the right one.

    ``all``: the argmax over every caption of one shape (kind × colour × size × position,
    216 of them); ``same_size``: with the size kept right (the preference pairs never corrupt
    the size, so the reward model has no reason to read it); ``position``: over the nine
    positions, the rest right. PPO maximises the reward model's score, so this — not the pair
    accuracy — bounds what it can reach.
    """
    hits = {"all": 0, "same_size": 0, "position": 0}
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
        grids["same_size"] = [g for g in grids["all"] if g["size"] == truth["size"]]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_rlhf")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run")
    parser.add_argument("--reuse", action="store_true", help="keep phases already done in --out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--weak-step", type=int, default=400, help="the policy's SFT checkpoint")
    parser.add_argument(
        "--rm-from",
        choices=("final", "weak"),
        default="final",
        help="the SFT checkpoint the reward model starts from",
    )
    parser.add_argument("--rm-steps", type=int, default=2000)
    parser.add_argument("--rm-batch", type=int, default=32, help="pairs per reward-model step")
    parser.add_argument("--ppo-rollouts", type=int, default=100)
    parser.add_argument("--dpo-steps", type=int, default=500)
    parser.add_argument("--rm-lr", type=float, default=3e-4)
    parser.add_argument("--ppo-lr", type=float, default=5e-4)
    parser.add_argument("--ppo-init-kl", type=float, default=0.1)
    parser.add_argument("--ppo-batch", type=int, default=32, help="prompts per rollout")
    parser.add_argument("--ppo-minibatch", type=int, default=64)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--ppo-samples", type=int, default=4, help="answers per prompt")
    parser.add_argument("--ppo-entropy", type=float, default=0.0, help="entropy bonus")
    parser.add_argument("--ppo-min-lr", type=float, default=None, help="default: lr / 10")
    parser.add_argument("--target-kl", type=float, default=4.0)
    parser.add_argument("--dpo-lr", type=float, default=5e-4, help="DPO+RPO (and NLL only)")
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO+RPO")
    parser.add_argument("--dpo-sft-weight", type=float, default=1.0, help="DPO+RPO")
    parser.add_argument("--plain-dpo-steps", type=int, default=500, help="0: skip plain DPO")
    parser.add_argument("--plain-dpo-lr", type=float, default=1e-4)
    parser.add_argument("--plain-dpo-beta", type=float, default=0.5)
    parser.add_argument("--plain-dpo-smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--rm-argmax-images", type=int, default=100)
    parser.add_argument("--phases", default="sft,rm,ppo,dpo")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.eval_images = 200, 40
        args.sft_steps, args.weak_step = 20, 10
        args.rm_steps, args.ppo_rollouts, args.dpo_steps, args.plain_dpo_steps = 10, 2, 10, 5
        args.rm_argmax_images = 5
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = set(args.phases.split(","))
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": vars(args), "world": WORLD, "encoder": ENCODER}
    results_path = out / "results.json"
    if args.reuse and results_path.is_file():
        results = {**json.loads(results_path.read_text()), "settings": vars(args)}

    def save_results() -> None:
        results["wall_s"] = round(time.perf_counter() - started, 1)
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    # data: preference pairs (train / held-out), prompts and eval images are disjoint seeds
    pairs_file = out / "data" / "train" / "preferences.jsonl"
    if not pairs_file.is_file() or len(pairs_file.read_text().splitlines()) != args.pairs:
        shutil.rmtree(out / "data", ignore_errors=True)
        write_shapes_preferences(out / "data" / "train", args.pairs, seed=SEEDS["pairs"], **WORLD)
        write_shapes_preferences(
            out / "data" / "eval", max(args.pairs // 10, 40), seed=SEEDS["pairs_eval"], **WORLD
        )
    train_pairs = PreferenceDataset(pairs_file)
    eval_pairs = PreferenceDataset(out / "data" / "eval" / "preferences.jsonl")
    eval_world = ShapesWorld(size=args.eval_images, seed=SEEDS["eval"], task="caption", **WORLD)
    tokenizer = build_tokenizer(out, pairs_file)
    log(f"data: {len(train_pairs)} train pairs, {len(eval_pairs)} held-out pairs")

    # 1. SFT: one caption run; the policy starts from its EARLY checkpoint (--weak-step, low
    #    exact match), the reward model from its end (see --rm-from)
    weak_dir, final_dir = out / "sft" / "weak", out / "sft" / "model"
    if not (args.reuse and weak_dir.is_dir() and final_dir.is_dir()):
        shutil.rmtree(out / "sft", ignore_errors=True)
        torch.manual_seed(0)
        model = MultimodalGPT.build(
            "gpt-nano", tokenizer, block_size=64, dropout=0.0, encoder_kwargs=ENCODER
        )
        world = ShapesWorld(size=100_000, seed=SEEDS["sft"], task="caption", **WORLD)
        t = time.perf_counter()
        trainer = Trainer(
            model,
            "sft",
            world,
            quiet_config(
                max_steps=args.sft_steps,
                batch_size=32,
                lr=2e-3,
                min_lr=2e-3,  # constant after warmup: the checkpoints are points of one run
                warmup_steps=100,
                save_every=args.weak_step,
                keep_last=100,
            ),
            collate_fn=model.processor(),
            out_dir=out / "sft",
        )
        trainer.fit()
        checkpoint = trainer.checkpoint_dir / checkpoint_name(args.weak_step)
        load_model_state(model, load_tensors(checkpoint / WEIGHTS_NAME), checkpoint)
        model.save_pretrained(weak_dir)
        results["sft_train_s"] = round(time.perf_counter() - t, 1)
    sft = MultimodalGPT.from_pretrained(weak_dir)
    results["sft"] = caption_eval(sft, eval_world, None)
    results["sft_final"] = caption_eval(MultimodalGPT.from_pretrained(final_dir), eval_world, None)
    log(f"SFT step {args.weak_step}: {results['sft']}")
    log(f"SFT step {args.sft_steps}: {results['sft_final']}")
    save_results()

    # 2. reward model
    rm_dir = out / "rm" / "model"
    if "rm" in phases and not (args.reuse and rm_dir.is_dir()):
        torch.manual_seed(0)
        t = time.perf_counter()
        start = sft if args.rm_from == "weak" else MultimodalGPT.from_pretrained(final_dir)
        trainer = RewardObjective().build_trainer(
            copy.deepcopy(start),
            train_pairs,
            quiet_config(
                max_steps=args.rm_steps,
                batch_size=args.rm_batch,
                lr=args.rm_lr,
                min_lr=args.rm_lr / 10,
                warmup_steps=20,
            ),
            eval_data=eval_pairs,
            out_dir=out / "rm",
        )
        trainer.fit()
        results["rm_train_s"] = round(time.perf_counter() - t, 1)
    reward_model = RewardModel.from_pretrained(rm_dir)
    results["reward_model"] = {
        "heldout_accuracy": reward_accuracy_by_corruption(reward_model, eval_pairs),
        "best_caption_accuracy": reward_best_caption_accuracy(
            reward_model, eval_world, args.rm_argmax_images
        ),
        "normalization": reward_model.normalization,
    }
    results["sft"] = caption_eval(sft, eval_world, reward_model)
    log(f"reward model: {results['reward_model']}")
    save_results()

    # 3. PPO from the weak SFT model against the reward model
    if "ppo" in phases:
        shutil.rmtree(out / "ppo", ignore_errors=True)
        torch.manual_seed(0)
        prompts = ShapesWorld(size=20_000, seed=SEEDS["prompts"], task="caption", **WORLD)
        eval_prompts = ShapesWorld(size=64, seed=SEEDS["eval"] + 100, task="caption", **WORLD)

        def caption_em(prompts: Any, answers: Any) -> dict[str, float]:
            return {"exact_match": exact_match(answers, [p.meta["caption"] for p in prompts])}

        t = time.perf_counter()
        trainer = PPOTrainer(
            copy.deepcopy(sft),
            reward_model,
            prompts,
            quiet_config(
                max_steps=args.ppo_rollouts,
                batch_size=args.ppo_batch,
                lr=args.ppo_lr,
                min_lr=args.ppo_lr / 10 if args.ppo_min_lr is None else args.ppo_min_lr,
                warmup_steps=0,
                log_every=1,
                eval_every=max(1, args.ppo_rollouts // 4),
                eval_batches=1,
            ),
            dict(
                max_new_tokens=24,
                ppo_epochs=args.ppo_epochs,
                samples_per_prompt=args.ppo_samples,
                entropy_coef=args.ppo_entropy,
                minibatch_size=args.ppo_minibatch,
                init_kl_coef=args.ppo_init_kl,
                target_kl=args.target_kl,
                kl_horizon=2000,
                vf_coef=0.1,
            ),
            eval_prompts=eval_prompts,
            out_dir=out / "ppo",
            eval_fn=caption_em,
        )
        trainer.fit()
        results["ppo_train_s"] = round(time.perf_counter() - t, 1)
        ppo = MultimodalGPT.from_pretrained(out / "ppo" / "model")
        results["ppo"] = caption_eval(ppo, eval_world, reward_model)
        results["ppo"]["kl_to_sft"] = sampled_kl(ppo, sft, eval_world)
        results["ppo"]["final_beta"] = trainer.kl_controller.beta
        log(f"PPO: {results['ppo']}")
        save_results()

    # 4. DPO from the weak SFT model on the same pairs: plain DPO (conservative: label
    #    smoothing; and without it), DPO with the RPO term (the chosen answers' NLL, weight
    #    --dpo-sft-weight), and that NLL term alone (SFT on the chosen answers, no DPO term)
    variants: dict[str, dict[str, Any]] = {}
    if args.plain_dpo_steps:
        plain = dict(beta=args.plain_dpo_beta, steps=args.plain_dpo_steps, lr=args.plain_dpo_lr)
        variants["dpo"] = {**plain, "label_smoothing": args.plain_dpo_smoothing}
        variants["dpo_no_smoothing"] = {**plain, "label_smoothing": 0.0}
    variants["dpo_rpo"] = dict(
        beta=args.dpo_beta, sft_weight=args.dpo_sft_weight, steps=args.dpo_steps, lr=args.dpo_lr
    )
    variants["nll_chosen"] = dict(steps=args.dpo_steps, lr=args.dpo_lr)
    for name, variant in variants.items():
        if "dpo" not in phases:
            break
        variant = dict(variant)
        steps, lr = variant.pop("steps"), variant.pop("lr")
        shutil.rmtree(out / name, ignore_errors=True)
        torch.manual_seed(0)
        t = time.perf_counter()
        config = quiet_config(
            max_steps=steps, batch_size=16, lr=lr, min_lr=lr / 10, warmup_steps=20
        )
        model = copy.deepcopy(sft)
        if name == "nll_chosen":
            chosen = [train_pairs[i].samples()[0] for i in range(len(train_pairs))]
            trainer = Trainer(
                model, "sft", chosen, config, collate_fn=model.processor(), out_dir=out / name
            )
        else:
            objective = DPOObjective(reference_batch_size=64, **variant)
            trainer = objective.build_trainer(
                model, train_pairs, config, eval_data=eval_pairs, out_dir=out / name
            )
        trainer.fit()
        results[f"{name}_train_s"] = round(time.perf_counter() - t, 1)
        tuned = MultimodalGPT.from_pretrained(out / name / "model")
        results[name] = caption_eval(tuned, eval_world, reward_model)
        results[name]["kl_to_sft"] = sampled_kl(tuned, sft, eval_world)
        results[name]["settings"] = {"steps": steps, "lr": lr, **variant}
        if name != "nll_chosen":
            results[name]["heldout_pairs"] = trainer.last_eval
        log(f"{name}: {results[name]}")
        save_results()

    save_results()
    summary = {
        name: {k: results[name].get(k) for k in ("exact_match", "reward", "kl_to_sft")}
        for name in ("sft", "sft_final", "ppo", "dpo", "dpo_no_smoothing", "dpo_rpo", "nll_chosen")
        if name in results
    }
    log(f"summary: {json.dumps(summary)}; wall {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
