"""The example plugin ``examples/mmgpt-audio``, pip-installed as users install it: mmgpt finds it
with no edit to mmgpt, it passes ``mmgpt.testing``'s checks, its data goes through ``mmgpt data
check``, ``mmgpt train``, ``mmgpt eval``, ``mmgpt generate --input`` and the chat demo in
Chromium (the tutorial's commands, run as written), a model with its encoder learns to name the
pitch of a tone, and the tutorial shows exactly its code.

Everything that needs the installed plugin runs in a subprocess with the install on
``PYTHONPATH`` (discovery starts cold there); the encoder's and dataset's own behaviour is
tested in-process from the source tree.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import wave
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmgpt import registry
from mmgpt.registry import DISABLE_ENV, ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mmgpt-audio"
TUTORIAL = ROOT / "docs" / "tutorials" / "write-a-modality-plugin.md"
# every file of the plugin distribution, shown in full by the tutorial
PLUGIN_FILES = (
    "pyproject.toml",
    "mmgpt_audio/__init__.py",
    "mmgpt_audio/encoder.py",
    "mmgpt_audio/loader.py",
    "mmgpt_audio/tones.py",
    "mmgpt_audio/make_data.py",
    "tests/test_conformance.py",
    "scripts/train_tones.py",
)
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


# -- the tutorial ---------------------------------------------------------------------------
def tutorial_blocks() -> list[tuple[str, str | None, str]]:
    """``(language, title, code)`` of every fenced block of the tutorial, in order."""
    blocks = []
    for match in FENCE.finditer(TUTORIAL.read_text(encoding="utf-8")):
        title = re.search(r'title="([^"]+)"', match.group(2))
        blocks.append((match.group(1), title.group(1) if title else None, match.group(3)))
    return blocks


def tutorial_commands() -> list[str]:
    return [
        line.strip()
        for lang, _, code in tutorial_blocks()
        if lang in ("bash", "console", "sh")
        for line in code.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def tutorial_command(prefix: str, site: Path | None = None) -> list[str]:
    """The tutorial's one command starting with ``prefix``, as an argv to run here (in a
    working directory where its relative ``runs/`` paths land): ``mmgpt`` and ``pytest``
    through this interpreter, the plugin's console script from the install at ``site``,
    repository paths absolute."""
    [line] = [c for c in tutorial_commands() if c == prefix or c.startswith(prefix + " ")]
    args = shlex.split(line)
    head = {
        "mmgpt": [sys.executable, "-m", "mmgpt"],
        "pytest": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        "python": [sys.executable],
        "mmgpt-audio-data": [str((site or Path()) / "bin" / "mmgpt-audio-data")],
    }[args[0]]
    rest = []
    for arg in args[1:]:
        if arg.startswith(("examples/", "./examples/")):
            arg = str(ROOT / arg)
        rest.append(arg)
    return head + rest


def test_the_tutorial_shows_every_plugin_file_exactly() -> None:
    """Titled blocks are slices of the file they name, in order, covering all of it (blank
    lines between slices aside): editing a file without the tutorial fails here."""
    parts: dict[str, list[str]] = {}
    for _, title, code in tutorial_blocks():
        if title is not None:
            parts.setdefault(title, []).append(code)
    expected = {f"examples/mmgpt-audio/{name}" for name in PLUGIN_FILES}
    assert set(parts) == expected
    for title, slices in parts.items():
        text = (ROOT / title).read_text(encoding="utf-8")
        pos = 0
        for i, code in enumerate(slices):
            while text.startswith("\n", pos):
                pos += 1
            if not text.startswith(code, pos):
                actual = text[pos : pos + len(code)]
                diff = "\n".join(
                    difflib.unified_diff(
                        actual.splitlines(), code.splitlines(), "file", "tutorial", lineterm=""
                    )
                )
                line = text.count("\n", 0, pos) + 1
                pytest.fail(
                    f"{TUTORIAL.name}: block {i + 1} of {title} differs from the file at line "
                    f"{line}; copy the file's code into the tutorial:\n{diff}"
                )
            pos += len(code)
        assert not text[pos:].strip(), f"{TUTORIAL.name} does not show the end of {title}"


# the tutorial's commands after the install, each run by a test below
RUN_COMMANDS = (
    "mmgpt plugins list",
    "pytest examples/mmgpt-audio/tests",
    "mmgpt-audio-data --out runs/tones/train",
    "mmgpt-audio-data --out runs/tones/test",
    "mmgpt data check",
    "mmgpt train vqa",
    "mmgpt eval",
    "mmgpt generate",
    "mmgpt demo",
    "python examples/mmgpt-audio/scripts/train_tones.py",
)


def test_every_tutorial_command_is_run_by_these_tests() -> None:
    commands = tutorial_commands()
    assert commands[0] == "pip install ./examples/mmgpt-audio"  # what the `site` fixture does
    assert len(commands[1:]) == len(RUN_COMMANDS)
    for prefix in RUN_COMMANDS:
        tutorial_command(prefix)  # exactly one command of the tutorial starts with it


# -- the installed plugin ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install ./examples/mmgpt-audio`` into a fresh directory (offline, no deps)."""
    root = tmp_path_factory.mktemp("audio-plugin")
    source = root / "mmgpt-audio"
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "runs")
    shutil.copytree(EXAMPLE, source, ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    cmd += ["--no-build-isolation", "--no-index", "--target", str(root / "site"), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "site"


def run(
    argv: list[str], site: Path, cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    # cwd outside the checkout: only installed packages are importable
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def table(output: str) -> set[tuple[str, ...]]:
    return {tuple(line.split()) for line in output.splitlines() if line.strip()}


def test_mmgpt_finds_the_installed_plugin(site: Path, tmp_path: Path) -> None:
    rows = table(run(tutorial_command("mmgpt plugins list"), site, tmp_path).stdout)
    assert ("encoder", "spectrogram", "mmgpt-audio") in rows
    assert ("dataset", "tones", "mmgpt-audio") in rows
    assert ("loader", "audio", "mmgpt-audio") in rows
    assert ("encoder", "vit", "mmgpt") in rows  # the built-ins are still there
    # this environment does not have it: the entries came from the install's entry point
    installed = {ep.dist.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist}
    assert "mmgpt-audio" not in installed


def test_the_plugin_passes_mmgpt_testing_checks(site: Path, tmp_path: Path) -> None:
    out = run(tutorial_command("pytest"), site, tmp_path).stdout
    assert re.search(r"\b\d+ passed\b", out) and "skipped" not in out, out


def test_the_tutorial_python_runs(site: Path, tmp_path: Path) -> None:
    code = "\n".join(c for lang, title, c in tutorial_blocks() if lang == "python" and not title)
    assert "registry.create" in code
    out = run([sys.executable, "-c", code], site, tmp_path).stdout
    assert "→" in out


def test_a_model_with_the_plugin_learns_pitch_and_reloads(site: Path, tmp_path: Path) -> None:
    """The tutorial's training script: 60 steps, greedy answers on held-out clips."""
    out = run(tutorial_command("python"), site, tmp_path, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["accuracy"] >= 0.8, result  # three pitches: chance is 1/3
    assert result["reload_identical"] is True
    config = json.loads((tmp_path / "runs" / "tones-python" / "model" / "config.json").read_text())
    assert config["encoders"]["audio"]["name"] == "spectrogram"
    assert config["encoders"]["audio"]["config"]["sample_rate"] == 8000


# -- the encoder and the dataset, in-process ----------------------------------------------------
@pytest.fixture(scope="module")
def audio():
    """``mmgpt_audio`` from the source tree; its registry entries are removed afterwards."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import mmgpt_audio

        yield mmgpt_audio
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m.partition(".")[0] == "mmgpt_audio"]:
            del sys.modules[name]
        registry.REGISTRY.unregister("encoder", "spectrogram")
        registry.REGISTRY.unregister("dataset", "tones")


def reference_filterbank(n_freqs: int, n_mels: int, sr: int, f_min: float, f_max: float):
    """The textbook triangles, one bin at a time."""

    def mel(f: float) -> float:
        return 2595 * math.log10(1 + f / 700)

    def hz(m: float) -> float:
        return 700 * (10 ** (m / 2595) - 1)

    points = [
        hz(mel(f_min) + (mel(f_max) - mel(f_min)) * i / (n_mels + 1)) for i in range(n_mels + 2)
    ]
    bank = np.zeros((n_mels, n_freqs))
    for m in range(n_mels):
        lo, centre, hi = points[m : m + 3]
        for k in range(n_freqs):
            f = k * (sr / 2) / (n_freqs - 1)
            if lo < f <= centre:
                bank[m, k] = (f - lo) / (centre - lo)
            elif centre < f < hi:
                bank[m, k] = (hi - f) / (hi - centre)
    return bank, points


def test_mel_filterbank_matches_the_textbook_triangles(audio) -> None:
    bank = audio.mel_filterbank(129, 20, 8000, f_min=100.0, f_max=3500.0)
    expected, points = reference_filterbank(129, 20, 8000, 100.0, 3500.0)
    np.testing.assert_allclose(bank.numpy(), expected, atol=1e-6)
    freqs = np.linspace(0, 4000, 129)
    between = (freqs >= points[1]) & (freqs <= points[-2])  # first to last centre
    np.testing.assert_allclose(bank.numpy()[:, between].sum(axis=0), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="f_max <= sample_rate / 2"):
        audio.mel_filterbank(129, 20, 8000, f_max=5000.0)
    with pytest.raises(ValueError, match="too many for 33 frequency bins"):
        audio.mel_filterbank(33, 64, 8000)


@pytest.mark.parametrize("n_mels", [0, 32])
def test_a_tone_lights_up_the_band_of_its_pitch(audio, n_mels: int) -> None:
    encoder = audio.SpectrogramEncoder(n_mels=n_mels)
    t = torch.arange(8000) / 8000
    for freq in (300.0, 1000.0, 2500.0):
        spec = encoder.spectrogram(encoder.preprocess([0.5 * torch.sin(2 * math.pi * freq * t)]))
        band = int(spec[0].mean(dim=1).argmax())
        if n_mels:
            _, points = reference_filterbank(129, n_mels, 8000, 0.0, 4000.0)
            nearest = int(np.abs(np.array(points[1:-1]) - freq).argmin())
            assert abs(band - nearest) <= 1, (freq, band, nearest)
        else:
            assert band == round(freq / (8000 / 256))  # STFT bins are 31.25 Hz apart


def test_preprocess_pads_crops_reads_wav_and_names_bad_input(audio, tmp_path: Path) -> None:
    encoder = audio.SpectrogramEncoder(duration=0.25)  # 2000 samples at 8 kHz
    short, long = torch.linspace(-0.5, 0.5, 1500), torch.rand(3000) - 0.5
    x = encoder.preprocess([short, long])
    assert x.shape == (2, 2000) and x.dtype == torch.float32
    assert torch.equal(x[0, :1500], short) and not x[0, 1500:].any()  # padded with silence
    assert torch.equal(x[1], long[:2000])  # the end is cropped

    audio.save_wav(tmp_path / "a.wav", short, 8000)
    from_file = encoder.preprocess(tmp_path / "a.wav")  # one path: a batch of one
    torch.testing.assert_close(from_file[0, :1500], short, atol=1 / 32767, rtol=0)
    with wave.open(str(tmp_path / "stereo8.wav"), "wb") as f:  # unsigned 8-bit, two channels
        f.setnchannels(2)
        f.setsampwidth(1)
        f.setframerate(8000)
        f.writeframes(bytes([192, 64] * 100 + [255, 255] * 100))
    mono, rate = audio.load_wav(tmp_path / "stereo8.wav")
    assert rate == 8000 and mono.shape == (200,)
    assert not mono[:100].any() and torch.allclose(mono[100:], torch.tensor(127 / 128))
    pcm = np.array([16384, -32768], dtype=np.int16)
    assert encoder.preprocess([pcm])[0, :2].tolist() == [0.5, -1.0]

    audio.save_wav(tmp_path / "fast.wav", short, 16000)
    with pytest.raises(
        ValueError,
        match=r"audio 1 \(.*fast\.wav\) has a sample rate of 16000 Hz, but this encoder expects 8000 Hz",
    ):
        encoder.preprocess([short, tmp_path / "fast.wav"])
    with pytest.raises(ValueError, match="audio 0 has a sample rate of 44100 Hz"):
        encoder.preprocess([(short, 44100)])
    with pytest.raises(ValueError, match=r"1-D \(mono\) waveform, got shape \(2, 100\)"):
        encoder.preprocess([torch.zeros(2, 100)])
    with pytest.raises(TypeError, match="must be a float waveform"):
        encoder.preprocess([torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="NaN or infinite"):
        encoder.preprocess([torch.tensor([0.0, float("nan")])])
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(ValueError, match=r"notes\.txt: not a PCM WAV file"):
        encoder.preprocess([tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match=r"shape \(N, 2000\).*run preprocess"):
        encoder(torch.zeros(1, 1999))


def test_encoder_config_round_trips_and_bad_sizes_are_errors(audio) -> None:
    encoder = registry.create("encoder", "spectrogram", n_mels=0, num_tokens=3, dim=32)
    config = encoder.config_dict()
    json.dumps(config)
    rebuilt = registry.create("encoder", "spectrogram", **config)
    assert rebuilt.config_dict() == config and rebuilt.num_tokens == 3 and rebuilt.output_dim == 32
    assert rebuilt.state_dict().keys() == encoder.state_dict().keys()
    with pytest.raises(ValueError, match="num_tokens=40 exceeds the 16 time steps"):
        audio.SpectrogramEncoder(num_tokens=40)
    with pytest.raises(ValueError, match="dim=30 is not divisible by num_heads=4"):
        audio.SpectrogramEncoder(dim=30)
    with pytest.raises(ValueError, match="num_tokens must be a positive int, got 0"):
        audio.SpectrogramEncoder(num_tokens=0)
    with pytest.raises(ValueError, match="fewer than n_fft=256"):
        audio.SpectrogramEncoder(duration=0.01)


def segments(clip: np.ndarray, sr: int) -> list[tuple[int, int]]:
    """(start, end) sample indices of the loud stretches of ``clip`` (10 ms frames)."""
    frame = sr // 100
    rms = np.sqrt((clip[: len(clip) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    active = np.concatenate([[False], rms > 0.04, [False]])
    edges = np.flatnonzero(np.diff(active.astype(int)))
    return [(a * frame, b * frame) for a, b in zip(edges[::2], edges[1::2])]


def test_tone_answers_are_what_the_audio_says(audio) -> None:
    """The answers are checked against the waveform itself: count of loud stretches, their
    dominant frequency, peak amplitude and duration."""
    tones = audio.tones
    data = registry.create("dataset", "tones", size=40, seed=3, max_tones=2)
    assert isinstance(data, audio.ToneDataset)
    again = audio.ToneDataset(size=40, seed=3, max_tones=2)
    other = audio.ToneDataset(size=40, seed=4, max_tones=2)
    kinds = set()
    for i in range(len(data)):
        sample = data[i]
        [clip] = sample.inputs["audio"]
        assert clip.shape == (8000,) and clip.dtype == torch.float32
        twin = again[i]
        assert twin.conversation == sample.conversation and torch.equal(
            twin.inputs["audio"][0], clip
        )
        assert not torch.equal(other[i].inputs["audio"][0], clip)
        assert sample.conversation[0].text == f"<audio>\n{sample.meta['question']}"
        assert sample.conversation[1].text == sample.meta["answer"]

        found = segments(clip.numpy().astype(np.float64), 8000)
        assert len(found) == len(sample.meta["tones"]), sample.meta
        heard = []
        for start, end in found:
            part = clip.numpy()[start:end]
            spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part))))
            freq = spectrum.argmax() * 8000 / len(part)
            heard.append(
                {
                    "pitch": min(
                        tones.PITCHES, key=lambda p: abs(math.log2(freq / tones.PITCHES[p]))
                    ),
                    "volume": min(
                        tones.VOLUMES, key=lambda v: abs(np.abs(part).max() - tones.VOLUMES[v])
                    ),
                    "length": min(
                        tones.LENGTHS, key=lambda n: abs((end - start) / 8000 - tones.LENGTHS[n])
                    ),
                }
            )
        qtype, target = sample.meta["question_type"], sample.meta["target"]
        kinds.add((qtype, len(found)))
        if qtype == "count":
            assert sample.meta["answer"] == tones.COUNTS[len(found) - 1]
        else:
            assert sample.meta["answer"] == heard[target][qtype], (heard, sample.meta)
            if len(found) == 2:
                assert ("first", "second")[target] in sample.meta["question"]
    assert {q for q, _ in kinds} == set(tones.QUESTION_TYPES) and {n for _, n in kinds} == {1, 2}
    with pytest.raises(ValueError, match="too short for 2 long tone"):
        audio.ToneDataset(duration=0.5, max_tones=2)
    with pytest.raises(ValueError, match="question_types must be a non-empty subset"):
        audio.ToneDataset(question_types=["colour"])


# -- the plugin through mmgpt's commands ---------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mmgpt demo exited:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mmgpt demo did not serve {url} within {timeout} s")


@pytest.mark.slow
def test_the_plugin_goes_through_train_eval_generate_and_the_demo(
    site: Path, tmp_path: Path, browser: Any
) -> None:
    """The tutorial's commands, as written, by subprocess: the plugin's command writes a
    LLaVA-style dataset of ``.wav`` clips; ``mmgpt data check`` reads every clip with the
    plugin's loader; ``mmgpt train vqa`` with the plugin's encoder (a recipe override) learns
    the pitch; ``mmgpt eval`` measures it; ``mmgpt generate --input audio=…`` answers; the
    chat demo in Chromium takes the uploaded WAV and answers it."""
    run(tutorial_command("mmgpt-audio-data --out runs/tones/train", site), site, tmp_path)
    run(tutorial_command("mmgpt-audio-data --out runs/tones/test", site), site, tmp_path)
    data = tmp_path / "runs" / "tones"
    answers = {
        r["audio"]: r["conversations"][1]["value"]
        for r in json.loads((data / "test" / "tones.json").read_text())
    }

    check = tutorial_command("mmgpt data check")
    report = json.loads(run([*check, "--json"], site, tmp_path).stdout)
    assert report["ok"] and report["format"] == "llava", report
    assert report["num_samples"] == 300 and report["num_inputs"] == {"audio": 300}

    run(tutorial_command("mmgpt train vqa"), site, tmp_path)
    config = json.loads((data / "run" / "model" / "config.json").read_text())
    assert set(config["encoders"]) == {"audio"}
    assert config["encoders"]["audio"]["name"] == "spectrogram"

    metrics = json.loads(run(tutorial_command("mmgpt eval"), site, tmp_path).stdout)
    assert metrics["task"] == "vqa" and metrics["num_samples"] == len(answers) == 24
    assert metrics["exact_match"] >= 0.8, metrics  # three pitches: chance is 1/3

    generate = tutorial_command("mmgpt generate")
    assert generate[-2:] == ["--temperature", "0"]  # greedy: the reply is the model's best
    [clip] = [a.partition("=")[2] for a in generate if a.startswith("audio=")]
    expected = answers[str(Path(clip).relative_to("runs/tones/test"))]
    reply = run([*generate, "--max-new-tokens", "4"], site, tmp_path)
    assert reply.stdout.strip() == expected
    # a bare path: the modality comes from the suffix, through the plugin's loader
    other = next(c for c, a in sorted(answers.items()) if a != expected)
    bare = [a if not a.startswith("audio=") else f"runs/tones/test/{other}" for a in generate]
    reply = run([*bare, "--max-new-tokens", "4"], site, tmp_path)
    assert reply.stdout.strip() == answers[other]

    demo = tutorial_command("mmgpt demo")
    question = generate[generate.index("--prompt") + 1]
    chat_in_the_browser(
        browser, demo, site, tmp_path, data / "test" / other, question, answers[other]
    )


def chat_in_the_browser(
    browser: Any, demo: list[str], site: Path, cwd: Path, wav: Path, question: str, answer: str
) -> None:
    """``demo`` (``mmgpt demo --model …``) served in a subprocess; Chromium uploads ``wav``
    and asks ``question``; the streamed reply must be ``answer``."""
    sync_api = pytest.importorskip("playwright.sync_api")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen(
        [*demo, "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, process)
        page = browser.new_page()
        try:
            page.set_default_timeout(30_000)
            sync_api.expect.set_options(timeout=30_000)
            page.goto(url)
            # greedy, as mmgpt eval decodes: the reply is the model's most likely one
            temperature = page.get_by_label("number input for Temperature")
            temperature.fill("0")
            temperature.press("Enter")
            slider = page.get_by_label("range slider for Temperature")
            sync_api.expect(slider).to_have_value("0")
            page.set_input_files("#message input[type=file]", str(wav))
            box = page.locator("#message textarea")
            box.fill(question)
            box.press("Enter")
            bot = page.locator("#chatbot [data-testid=bot]")
            sync_api.expect(bot.last).to_have_text(answer)
            # the upload is shown in the conversation as audio, with a player
            sync_api.expect(page.locator("#chatbot [data-testid=user] audio")).to_have_count(1)
        finally:
            page.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
