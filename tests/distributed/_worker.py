"""Training scenarios for the distributed tests, run in one process or under torchrun.

``test_distributed.py`` imports this file for the single-process references and launches

    torchrun --standalone --nproc_per_node 2 _worker.py SPEC.json

for the two-process runs: SPEC lists scenarios, run one after the other in one process group.
Every rank writes ``rank{r}.json`` into the scenario's directory (the sample indices it read,
the bytes of its parameter/gradient/optimizer shards).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.utils.data import Dataset

VOCAB, BLOCK = 64, 16
TRAIN_WINDOWS, EVAL_WINDOWS = 26, 7  # 7: the two ranks get unequal eval splits
GLOBAL_BATCH = 4  # per micro-batch, over all ranks


class Windows(Dataset):
    """Random token windows that remember which indices were read."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (n, BLOCK + 1), generator=generator)
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.seen.append(int(index))
        return {"input_ids": self.data[index]}


def gpt_model() -> Any:
    from mmgpt.config import gpt_config
    from mmgpt.model import GPT

    torch.manual_seed(0)
    return GPT(
        gpt_config("gpt-nano", n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=VOCAB)
    )


def train_config(world_size: int, **overrides: Any) -> dict[str, Any]:
    config = dict(
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=1,
        max_steps=4,
        batch_size=GLOBAL_BATCH // world_size,
        grad_accum_steps=2,
        eval_every=2,
        eval_batches=0,
        save_every=2,
        keep_last=5,
        log_every=1,
        progress=False,
        tensorboard=False,
        device="cpu",
        seed=0,
    )
    config.update(overrides)
    return config


def shard_bytes(trainer: Any) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards)."""

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = [p for p in trainer.model.parameters()]
    return {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            size(v)
            for state in trainer.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ),
    }


def run_gpt(out: Path, *, world_size: int = 1, resume: bool = False, **overrides: Any) -> dict:
    """Train the tiny GPT; returns what the rank saw."""
    from mmgpt.trainer import Trainer

    train, held = Windows(TRAIN_WINDOWS, 1), Windows(EVAL_WINDOWS, 2)
    trainer = Trainer(
        gpt_model(), "lm", train, train_config(world_size, **overrides), eval_data=held, out_dir=out
    )
    trainer.fit(resume=resume)
    seen = list(train.seen)
    # one more accumulation's gradients, to measure their shards
    samples = [{"input_ids": train.data[i]} for i in range(trainer.config.batch_size)]
    trainer.compute_gradients([trainer.train_loader.collate_fn(samples)])
    return {"indices": seen, "bytes": shard_bytes(trainer), "rank": trainer.rank}


# -- multimodal -----------------------------------------------------------------------------


def shapes(n: int, seed: int) -> Any:
    from mmgpt.data.shapes import ShapesWorld

    return ShapesWorld(size=n, task="caption", image_size=32, max_shapes=1, seed=seed)


class MixedCaptions(Dataset):
    """Shapes-world captions; odd samples are text-only (no image), as in LLaVA's data mix,
    so a rank's micro-batch may leave the image encoder unused."""

    def __init__(self, n: int, seed: int) -> None:
        self.world = shapes(n, seed)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> Any:
        from mmgpt.data.sample import Sample, Turn

        sample = self.world[index]
        if index % 2:
            answer = sample.conversation[-1].text
            return Sample([Turn("user", "Describe a shape."), Turn("assistant", answer)])
        return sample


class CountingCollate:
    """The model's processor, remembering how many images each batch held."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.images: list[int] = []

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.processor(samples)
        self.images.append(0 if batch.images is None else int(batch.images.size(0)))
        return batch


def train_tokenizer(directory: Path) -> None:
    """A small BPE tokenizer on shapes-world captions, saved to ``directory``."""
    from mmgpt.data.shapes import caption
    from mmgpt_text import TextTokenizer

    world = shapes(400, 0)
    lines = [
        f"User: Describe the image.\nAssistant: {caption(world.scene(i))}\n" for i in range(400)
    ]
    corpus = directory.parent / "captions.txt"
    corpus.write_text("".join(lines))
    TextTokenizer.train([corpus], vocab_size=300, num_signal_tokens=2).save(directory)


def multimodal_model(tokenizer_dir: Path) -> Any:
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt_text import TextTokenizer

    tokenizer = TextTokenizer.from_file(tokenizer_dir)
    torch.manual_seed(0)
    return MultimodalGPT.build(
        "gpt-nano",
        tokenizer,
        encoder="vit",
        encoder_kwargs={"name": "vit_tiny_custom"},
        projector="mlp2x_gelu",
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
    )


def run_multimodal(
    out: Path, tokenizer_dir: Path, *, world_size: int = 1, **overrides: Any
) -> dict:
    from mmgpt.trainer import Trainer

    model = multimodal_model(tokenizer_dir)
    config = train_config(world_size, max_steps=3, grad_accum_steps=1, save_every=0, **overrides)
    collate = CountingCollate(model.processor())
    trainer = Trainer(
        model,
        "sft",
        MixedCaptions(16, 1),
        config,
        eval_data=MixedCaptions(5, 2),
        collate_fn=collate,
        out_dir=out,
    )
    trainer.fit()
    return {"rank": trainer.rank, "images_per_batch": collate.images}


# -- torchrun entry point ---------------------------------------------------------------------


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    world_size = int(os.environ["WORLD_SIZE"])
    for scenario in spec["scenarios"]:
        out = Path(scenario["out"])
        kind = scenario.pop("kind")
        scenario.pop("out")
        if kind == "gpt":
            record = run_gpt(out, world_size=world_size, **scenario)
        elif kind == "cli":  # `torchrun ... -m mmgpt.cli train RECIPE ...`, in-process
            from mmgpt.cli import main as cli_main

            args = ["train", "lm", "--data", scenario["data"], "--out", str(out)]
            assert cli_main([*args, *scenario["overrides"]]) == 0
            record = {"rank": int(os.environ["RANK"])}
        else:
            record = run_multimodal(out, Path(spec["tokenizer"]), world_size=world_size, **scenario)
        (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
