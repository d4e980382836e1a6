"""Exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one.

The subprocess runs the real recipe entry point on a tiny GPT with dropout (so the RNG state
matters), gradient accumulation and epoch boundaries inside steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from mmgpt.config import GPTConfig
from mmgpt.files import CorruptCheckpointError, load_tensors
from mmgpt.model import GPT
from mmgpt.objectives.lm import LMObjective
from mmgpt.trainer import TrainConfig, Trainer

SCRIPT = """
import os, sys, time
import torch
torch.set_num_threads(1)
from mmgpt.objectives.lm import LMObjective
from mmgpt.registry import register

DELAY = float(os.environ.get("STEP_DELAY", "0"))
SAVE_DELAY = float(os.environ.get("SAVE_DELAY", "0"))

if SAVE_DELAY:  # slow checkpoint writes down, so that a test can kill the process inside one
    import mmgpt.checkpoint as checkpoint

    _save_tensors = checkpoint.save_tensors

    def slow_save_tensors(*args, **kwargs):
        time.sleep(SAVE_DELAY)
        return _save_tensors(*args, **kwargs)

    checkpoint.save_tensors = slow_save_tensors


@register("objective", "lm-paced")
class PacedLM(LMObjective):
    # lm, slowed down on request so that the test can kill the process mid-run
    def __call__(self, model, batch):
        if DELAY and model.training:
            time.sleep(DELAY)
        return super().__call__(model, batch)


from mmgpt.recipe import main

raise SystemExit(main(sys.argv[1:]))
"""

RECIPE = """
model: {preset: gpt-nano, n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, dropout: 0.1}
tokenizer: {name: bpe, vocab_size: 300}
data: {name: text, eval_fraction: 0.2}
objective: {name: lm-paced}
train:
  lr: 3e-3
  min_lr: 3e-4
  warmup_steps: 4
  max_steps: 30
  batch_size: 4
  grad_accum_steps: 2
  eval_every: 5
  eval_batches: 2
  save_every: 10
  keep_last: 2
  log_every: 1
  seed: 7
  progress: false
  tensorboard: false
  device: cpu
"""

MAX_STEPS, SAVE_EVERY = 30, 10


def write_corpus(directory: Path) -> None:
    rng = random.Random(0)
    words = ["the", "a", "small", "red", "blue", "cat", "dog", "bird", "sat", "ran", "on"]
    words += ["under", "near", "mat", "log", "tree", "and"]
    directory.mkdir()
    for name in ("one", "two"):
        lines = [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(60)]
        (directory / f"{name}.txt").write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    pytest.importorskip("mmgpt_text")  # the recipe trains the "bpe" tokenizer
    root = tmp_path_factory.mktemp("resume")
    write_corpus(root / "corpus")
    (root / "run.py").write_text(SCRIPT)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def start(
    root: Path, out: Path, *, resume: bool = False, delay: float = 0.0, save_delay: float = 0.0
) -> subprocess.Popen:
    cmd = [sys.executable, str(root / "run.py"), str(root / "recipe.yaml")]
    cmd += ["--data", str(root / "corpus"), "--out", str(out)]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_DELAY": str(delay)}
    env["SAVE_DELAY"] = str(save_delay)
    env["MMGPT_DISABLE_PLUGIN_AUTOLOAD"] = "0"
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root
    )


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"training failed:\n{out}\n{err}"
    return out, err


def metrics(out: Path) -> list[dict]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("tokens_per_s", None)  # wall-clock dependent
    return records


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def test_sigkill_then_resume_is_bit_identical(setup: Path) -> None:
    reference, out = setup / "reference", setup / "killed"
    ref_proc = start(setup, reference)  # runs alongside the one that gets killed
    proc = start(setup, out, delay=0.04)
    metrics_file = out / "metrics.jsonl"
    deadline = time.monotonic() + 90
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_file.is_file():
            steps = [json.loads(x)["step"] for x in metrics_file.read_text().splitlines() if x]
            if steps and steps[-1] >= SAVE_EVERY + 3:  # past the first checkpoint
                proc.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
                break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=30)
    assert killed_at is not None, f"the run ended before it could be killed:\n{err}"
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < MAX_STEPS and not (out / "model").exists()
    assert (out / "checkpoints" / f"step_{SAVE_EVERY:08d}").is_dir()

    stdout, _ = finish(start(setup, out, resume=True))
    finish(ref_proc)

    assert f"resuming at step {SAVE_EVERY}" in stdout
    assert_same_weights(reference / "model", out / "model")
    assert metrics(out) == metrics(reference)
    assert [r["step"] for r in metrics(out) if r["split"] == "train"] == list(range(1, 31))
    final = f"checkpoints/step_{MAX_STEPS:08d}"
    opt_a = load_tensors(reference / final / "optimizer.safetensors")
    opt_b = load_tensors(out / final / "optimizer.safetensors")
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    # the output model loads and carries its tokenizer
    assert GPT.from_pretrained(out / "model").config.dropout == 0.1
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["tokenizer"]["name"] == "bpe" and (out / "model" / "tokenizer.json").is_file()


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps[-1] if steps else 0


def kill_when(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            return
        time.sleep(0.005)
    _, err = proc.communicate(timeout=30)
    pytest.fail(f"the run ended before it could be killed {what}:\n{err}")


def test_sigkill_at_several_points_each_resume_exact(setup: Path) -> None:
    """Killed three times — mid-step twice at random steps, then inside a checkpoint write —
    and resumed each time, the run still ends bit-identical to an uninterrupted one."""
    rng = random.Random(1234)
    reference, out = setup / "reference-chain", setup / "chain"
    ref_proc = start(setup, reference)
    checkpoints = out / "checkpoints"
    for resume, at in ((False, rng.randint(11, 19)), (True, rng.randint(21, 28))):
        proc = start(setup, out, resume=resume, delay=0.03)
        kill_when(proc, lambda at=at: last_step(out) >= at, f"at step {at}")
    proc = start(setup, out, resume=True, delay=0.03, save_delay=0.3)
    final = f"step_{MAX_STEPS:08d}"
    kill_when(
        proc,
        lambda: any(p.name.startswith(f".tmp-{final}") for p in checkpoints.iterdir()),
        f"while writing {final}",
    )
    assert not (checkpoints / final).exists() and not (out / "model").exists()

    stdout, _ = finish(start(setup, out, resume=True))
    finish(ref_proc)
    assert f"resuming at step {2 * SAVE_EVERY}" in stdout
    assert_same_weights(reference / "model", out / "model")
    assert metrics(out) == metrics(reference)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    # what the resumes recomputed is kept aside, not lost
    superseded = (out / "metrics.superseded.jsonl").read_text().splitlines()
    assert {json.loads(x)["step"] for x in superseded} >= {SAVE_EVERY + 1, 2 * SAVE_EVERY + 1}


def test_a_second_run_into_the_same_folder_is_refused(setup: Path) -> None:
    out = setup / "locked"
    first = start(setup, out, delay=0.25)  # slow enough to outlive the second's start
    deadline = time.monotonic() + 60
    while last_step(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    recipe = (out / "recipe.yaml").read_bytes()
    second = start(setup, out, resume=True)  # a resume too must wait for the run to end
    _, err = second.communicate(timeout=60)
    assert first.poll() is None, "the first run ended before the second could collide"
    assert second.returncode != 0 and "DirectoryLockedError" in err
    assert "in use by a training run" in err and str(out) in err
    assert (out / "recipe.yaml").read_bytes() == recipe  # the second wrote nothing there
    first.kill()
    first.communicate(timeout=30)
    steps = [r["step"] for r in metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, in order


# -- the same guarantees in process (fast, no subprocess) ------------------------------------


class Windows(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 50, (10, 9), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


class Crash(LMObjective):
    """lm that raises at a given training call, like a process dying mid-run."""

    def __init__(self, crash_at: int | None) -> None:
        super().__init__()
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.crash_at:
                raise KeyboardInterrupt("simulated crash")
        return super().__call__(model, batch)


def trainer(out: Path, crash_at: int | None = None) -> Trainer:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.2))
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=9, batch_size=3,
                      grad_accum_steps=2, save_every=4, keep_last=1, eval_every=3,
                      log_every=1, progress=False, tensorboard=False, device="cpu")  # fmt: skip
    return Trainer(model, Crash(crash_at), Windows(), cfg, eval_data=Windows(), out_dir=out)


def test_in_process_crash_and_resume(tmp_path: Path) -> None:
    ref = trainer(tmp_path / "ref")
    ref.fit()
    crashed = trainer(tmp_path / "run", crash_at=2 * 6 + 1)  # during step 7
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')  # a line cut off by the crash
    resumed = trainer(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(resume=True)
    assert not [w for w in caught if w.category is RuntimeWarning]  # unchanged config: silent
    assert resumed.step == 9
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")
    lines = (tmp_path / "run" / "metrics.superseded.jsonl").read_text().splitlines()
    superseded = [json.loads(x) for x in lines]  # the records the resume recomputed
    assert [r["step"] for r in superseded if r["split"] == "train"] == [5, 6]


def test_resume_with_only_damaged_checkpoints_stops_and_keeps_everything(tmp_path: Path) -> None:
    run = trainer(tmp_path / "run")
    run.config.keep_last = 2
    run.fit()
    log = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    for step in (8, 9):
        weights = tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:64])
    for attempt in range(2):  # the second attempt finds only the quarantined ones
        resumed = trainer(tmp_path / "run")
        damaged = r"every one is damaged.*step_0000000"
        with pytest.raises(CorruptCheckpointError, match=damaged), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            resumed.fit(resume=True)
        assert resumed.step == 0, f"attempt {attempt} trained"
        assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_00000008.corrupt",
        "step_00000009.corrupt",
    ]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import errno

    import mmgpt.checkpoint as checkpoint

    real = checkpoint.save_tensors

    def fill_disk(tensors, path, metadata=None):
        if "step_00000008" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_tensors", fill_disk)
    run = trainer(tmp_path / "run")
    with pytest.raises(
        OSError, match=r"step_00000008: could not write.*No space.*step_00000004 is intact"
    ):
        run.fit()
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]
    checkpoint.verify_checkpoint_dir(root / "step_00000004")
    resumed = trainer(tmp_path / "run")
    resumed.fit(resume=True)  # once there is space again
    assert resumed.step == 9


def test_corrupt_newest_checkpoint_falls_back_and_stays_identical(tmp_path: Path) -> None:
    ref = trainer(tmp_path / "ref")
    ref.config.keep_last = 2
    ref.fit()
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    shutil.rmtree(run / "model")  # must be produced again by the resumed run
    newest = run / "checkpoints" / "step_00000009" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated

    resumed = trainer(run)
    resumed.config.keep_last = 2
    with pytest.warns(
        RuntimeWarning, match=r"step_00000009 is damaged.*model\.safetensors.*falling back"
    ):
        resumed.fit(resume=True)

    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert_same_weights(tmp_path / "ref" / "model", run / "model")
    assert metrics(run) == metrics(tmp_path / "ref")
    assert (run / "checkpoints" / "step_00000009.corrupt").is_dir()  # kept for inspection
    assert sorted(p.name for p in (run / "checkpoints").glob("step_????????")) == [
        "step_00000008",
        "step_00000009",
    ]


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path, capsys) -> None:
    run = trainer(tmp_path / "run")
    run.config.max_steps = 2
    run.fit(resume=True)
    assert "no checkpoint" in capsys.readouterr().out
    assert run.step == 2
