"""benchmarks/bench_rlhf.py: the weak policy chosen by validation exact match, the reward-model
gate of the RL runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_rlhf", ROOT / "benchmarks" / "bench_rlhf.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rlhf"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_rlhf", None)


def scripted_checkpoints(bench, monkeypatch, curve: dict[int, float]) -> list[int]:
    """Checkpoint k 'holds' step k; caption_eval reports ``curve[k]`` for it. Returns the
    list of steps loaded, in order."""
    loaded: list[int] = []
    state = {}

    def load_model_state(model, tensors, checkpoint):
        step = int(Path(checkpoint).name.removeprefix("step_"))
        loaded.append(step)
        state["step"] = step

    monkeypatch.setattr(bench, "load_tensors", lambda path: {})
    monkeypatch.setattr(bench, "load_model_state", load_model_state)
    monkeypatch.setattr(
        bench, "caption_eval", lambda model, world, rm: {"exact_match": curve[state["step"]]}
    )
    return loaded


def test_weak_policy_is_the_first_checkpoint_in_the_band(bench, monkeypatch, tmp_path) -> None:
    curve = {25: 0.0, 50: 0.1, 75: 0.26, 100: 0.33, 125: 0.9}
    loaded = scripted_checkpoints(bench, monkeypatch, curve)
    choice = bench.choose_weak_checkpoint(object(), tmp_path, list(curve), None, (0.25, 0.40))
    # the first in the band, not the one nearer its middle; evaluation stops there
    assert choice["step"] == 75 and choice["val_exact_match"] == 0.26
    assert choice["curve"] == [[25, 0.0], [50, 0.1], [75, 0.26]]
    assert loaded[-1] == 75  # the model is left holding the chosen checkpoint


def test_weak_policy_without_a_checkpoint_in_the_band_is_the_closest(
    bench, monkeypatch, tmp_path
) -> None:
    curve = {25: 0.0, 50: 0.125, 75: 0.625, 100: 0.125, 125: 0.875}
    loaded = scripted_checkpoints(bench, monkeypatch, curve)
    choice = bench.choose_weak_checkpoint(object(), tmp_path, list(curve), None, (0.25, 0.5))
    # 0.125 (0.125 below) and 0.625 (0.125 above) tie: the earliest of them
    assert choice["step"] == 50 and len(choice["curve"]) == 5
    assert loaded[-1] == 50


def test_weak_band_argument_is_checked(bench) -> None:
    assert bench.parse_band("0.2,0.5") == (0.2, 0.5)
    for bad in ("0.5", "0.5,0.2", "a,b", "0.2,1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--weak-band"):
            bench.parse_band(bad)


def test_quick_run_records_the_weak_choice_and_the_gate_stops_rl(bench, tmp_path) -> None:
    """A gate no reward model can pass (its pick right more often than a random sample by more
    than 1) skips the RL runs and says so; the DPO family still runs."""
    out = tmp_path / "seed_0"
    bench.main(["--quick", "--out", str(out), "--rm-gate", "1.5", "--phases", "rm,ppo,grpo,dpo"])
    results = json.loads((out / "results.json").read_text())
    weak = results["weak_policy"]
    assert weak["step"] in [step for step, _ in weak["curve"]]
    assert weak["band"] == [0.25, 0.40]
    gate = results["reward_model"]["gate"]
    assert gate["passed"] is False and gate["margin"] == 1.5
    assert results["rl_skipped"] == "reward-model gate"
    assert "ppo" not in results and "grpo" not in results and not (out / "ppo").exists()
    assert "dpo" in results
