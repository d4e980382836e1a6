"""Train a tiny audio question-answering model on the tones dataset, then test and reload it.

    python scripts/train_tones.py --out runs/tones

Everything comes from mmgpt's registry: the ``"tones"`` dataset and the ``"spectrogram"``
encoder from this plugin, the ``"bpe"`` tokenizer, the ``"mlp2x_gelu"`` projector and the
``"sft"`` objective from mmgpt. Prints the accuracy of greedy answers on held-out clips as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from mmgpt import registry
from mmgpt.generation import GenerationConfig
from mmgpt.multimodal import MultimodalGPT
from mmgpt.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--questions", default="pitch", help="comma-separated question types")
    parser.add_argument("--max-tones", type=int, default=1, help="tones per clip (1 or 2)")
    parser.add_argument("--test-size", type=int, default=60, help="held-out clips")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. Data: the plugin's dataset, found by name. Held-out clips come from another seed.
    options = dict(question_types=args.questions.split(","), max_tones=args.max_tones)
    train = registry.create("dataset", "tones", size=4000, seed=args.seed, **options)
    test = registry.create("dataset", "tones", size=args.test_size, seed=args.seed + 1, **options)

    # 2. A byte-level BPE tokenizer trained on the dataset's questions and answers.
    corpus = args.out / "corpus.txt"
    corpus.write_text(train.corpus() * 20, encoding="utf-8")
    tokenizer = registry.create("tokenizer", "bpe", files=[corpus], vocab_size=360)

    # 3. The model: the plugin's audio encoder, a projector and a small GPT.
    model = MultimodalGPT.build(
        "gpt-nano",
        tokenizer,
        encoder="spectrogram",
        encoder_kwargs=dict(sample_rate=train.sample_rate, duration=train.duration),
        projector="mlp2x_gelu",
        block_size=64,
    )

    # 4. Train with mmgpt's trainer: the processor turns Samples into batches, "<audio>"
    #    into the encoder's num_tokens slots; the "sft" objective learns the answers.
    config = TrainConfig(
        lr=3e-3,
        min_lr=3e-4,
        weight_decay=0.0,
        warmup_steps=5,
        max_steps=args.steps,
        batch_size=16,
        eval_every=0,
        save_every=0,
        log_every=10,
        seed=args.seed,
        progress=False,
        tensorboard=False,
    )
    trainer = Trainer(model, "sft", train, config, collate_fn=model.processor(), out_dir=args.out)
    trainer.fit()  # writes args.out / "model", a directory MultimodalGPT.from_pretrained reads

    # 5. Greedy answers to held-out questions: the audio goes in `inputs`, keyed by modality.
    samples = [test[i] for i in range(len(test))]
    replies = model.generate(
        [s.conversation[:1] for s in samples],
        inputs=[s.inputs for s in samples],
        config=GenerationConfig(max_new_tokens=6, temperature=0),
    ).texts
    accuracy = sum(r == s.meta["answer"] for r, s in zip(replies, samples)) / len(samples)

    # 6. The saved model reloads (its encoder rebuilt through the registry) to the same logits.
    loaded = MultimodalGPT.from_pretrained(args.out / "model").eval()
    batch = model.processor()(samples[:8])
    with torch.no_grad():
        same = torch.equal(model.eval()(batch).logits, loaded(batch).logits)

    result = {"accuracy": accuracy, "reload_identical": same, "examples": replies[:5]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
