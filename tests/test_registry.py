"""The registry: unit tests on fresh registries, and entry-point discovery of real installed
plugin distributions (tests/fixtures/*), checked in subprocesses so discovery starts cold."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mmgpt.registry
from mmgpt.registry import DISABLE_ENV, KINDS, SKIP_ENV, PluginError, Registry, RegistryError

FIXTURES = Path(__file__).parent / "fixtures"
GOOD, BROKEN = "mmgpt-fixture-good", "mmgpt-fixture-broken"


# -- a fresh registry ------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    # Lookups import mmgpt's built-in modules (they register into the global registry, not
    # this one); entry points are off so the test sees only what it registers itself.
    monkeypatch.setenv(DISABLE_ENV, "1")
    return Registry()


def test_unknown_name_lists_known_names_and_closest_match(registry: Registry) -> None:
    registry.register("encoder", "vit-small", object())
    registry.register("encoder", "resnet", object())
    with pytest.raises(RegistryError) as info:
        registry.get("encoder", "vit-smal")
    message = str(info.value)
    assert "unknown encoder 'vit-smal'" in message
    assert "resnet, vit-small" in message
    assert "did you mean 'vit-small'?" in message
    with pytest.raises(RegistryError, match=r"known decoders: \(none\)$"):
        registry.get("decoder", "unet")
    with pytest.raises(RegistryError) as info:
        registry.create("encoder", "zzzz")
    assert "did you mean" not in str(info.value)


def test_registry_error_is_a_key_error_with_a_readable_message(registry: Registry) -> None:
    with pytest.raises(KeyError) as info:
        registry.get("metric", "bleu")
    assert str(info.value).startswith("unknown metric 'bleu'")  # not repr()-quoted


def test_duplicate_name_raises_unless_override(registry: Registry) -> None:
    first, second = object(), object()
    registry.register("projector", "mlp", first)
    with pytest.raises(
        RegistryError, match=r"projector 'mlp' is already registered.*override=True"
    ):
        registry.register("projector", "mlp", second)
    assert registry.get("projector", "mlp") is first
    registry.register("projector", "mlp", first)  # the same object again: a re-import, fine
    registry.register("projector", "mlp", second, override=True)
    assert registry.get("projector", "mlp") is second
    # the same name under another kind is a different entry
    registry.register("encoder", "mlp", first)
    assert registry.get("encoder", "mlp") is first


def test_unknown_kind(registry: Registry) -> None:
    for call in (
        lambda: registry.register("encoders", "x", object()),
        lambda: registry.get("widget", "x"),
        lambda: registry.names("widget"),
        lambda: registry.entries("widget"),
    ):
        with pytest.raises(RegistryError) as info:
            call()
        assert "unknown registry kind" in str(info.value)
        assert all(kind in str(info.value) for kind in KINDS)


@pytest.mark.parametrize("bad", ["", None, 3])
def test_names_must_be_non_empty_strings(registry: Registry, bad: object) -> None:
    with pytest.raises(RegistryError, match="non-empty strings"):
        registry.register("metric", bad, object())  # type: ignore[arg-type]


def test_decorator_returns_the_object(registry: Registry) -> None:
    @registry.register("metric", "exact")
    def exact(a: str, b: str) -> float:
        return float(a == b)

    @registry.register("encoder", "toy")
    class Toy:
        pass

    assert exact("x", "x") == 1.0 and exact.__name__ == "exact"
    assert isinstance(Toy, type) and Toy.__name__ == "Toy"
    assert registry.get("metric", "exact") is exact
    assert registry.get("encoder", "toy") is Toy
    assert registry.names("encoder") == ["toy"]


def test_create_passes_kwargs(registry: Registry) -> None:
    class Projector:
        def __init__(self, in_dim: int, out_dim: int = 8, **extra: object) -> None:
            self.in_dim, self.out_dim, self.extra = in_dim, out_dim, extra

    registry.register("projector", "linear", Projector)
    p = registry.create("projector", "linear", in_dim=3, out_dim=5)
    assert (p.in_dim, p.out_dim, p.extra) == (3, 5, {})
    # kwargs named like create's own parameters reach the factory (they are positional-only)
    p = registry.create("projector", "linear", in_dim=1, kind="k", name="n")
    assert p.extra == {"kind": "k", "name": "n"}
    with pytest.raises(TypeError):
        registry.create("projector", "linear")  # the factory's own error surfaces

    registry.register("metric", "constant", 42)
    assert registry.get("metric", "constant") == 42
    with pytest.raises(RegistryError, match="not callable"):
        registry.create("metric", "constant")


def test_entries_and_distribution_of_local_registrations(registry: Registry) -> None:
    registry.register("metric", "b", len)
    registry.register("encoder", "a", Registry)
    # kind order, then name; an object from mmgpt itself belongs to distribution "mmgpt",
    # one from another installed package to that package's distribution
    assert [(e.kind, e.name) for e in registry.entries()] == [("encoder", "a"), ("metric", "b")]
    assert registry.distribution_of("encoder", "a") == "mmgpt"
    registry.register("metric", "pytest-main", pytest.main)
    assert registry.distribution_of("metric", "pytest-main") == "pytest"
    registry.unregister("metric", "b")
    assert registry.names("metric") == ["pytest-main"]


# -- installed plugin distributions ----------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The two fixture distributions, pip-installed (offline, no deps), as a PYTHONPATH.

    The broken plugin comes first on the path, so its entry point loads first: it imports the
    good plugin's package halfway through its own failing import.
    """
    root = tmp_path_factory.mktemp("plugins")
    sources = []
    for name in ("mmgpt_fixture_good", "mmgpt_fixture_broken"):
        # build from a copy: setuptools writes build/ and *.egg-info next to the sources
        shutil.copytree(FIXTURES / name, root / "src" / name)
        sources.append(str(root / "src" / name))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    cmd += ["--no-build-isolation", "--no-index", "--target", str(site), *sources]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    first = root / "first"
    first.mkdir()
    for path in site.glob("mmgpt_fixture_broken*"):
        shutil.move(str(path), str(first / path.name))
    return os.pathsep.join([str(first), str(site)])


def run_python(
    code: str, site: str, env: dict[str, str] | None = None, args: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    environ.update(PYTHONPATH=site, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, *(args if args is not None else ["-c", textwrap.dedent(code)])]
    cwd = site.split(os.pathsep)[0]  # not the checkout: only installed packages are found
    result = subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


DISCOVERY = """
    import json, sys, warnings
    import mmgpt, mmgpt.registry as r

    loaded_before = sorted(m for m in sys.modules if m.startswith("mmgpt_fixture"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder_factory = r.get("encoder", "fixture-encoder")
    loaded_after = sorted(m for m in sys.modules if m.startswith("mmgpt_fixture"))
    encoder = r.create("encoder", "fixture-encoder", num_tokens=3, output_dim=5)
    try:
        r.get("metric", "no-such-metric")
    except r.RegistryError as exc:
        unknown_error = str(exc)
    print(json.dumps({
        "loaded_before": loaded_before,
        "loaded_after": loaded_after,
        "encoder_sizes": [encoder.num_tokens, encoder.output_dim],
        "metric": r.create("metric", "fixture-exact-match", predictions=["a", "b"],
                           references=["a", "c"]),
        "hook_objective": r.create("objective", "fixture-objective", x=1),
        "distributions": {f"{e.kind}:{e.name}": e.distribution for e in r.entries()},
        "errors": [[e.entry_point, e.distribution, e.error] for e in r.REGISTRY.plugin_errors],
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "unknown_error": unknown_error,
    }))
"""


@pytest.fixture(scope="module")
def discovery(plugin_site: str) -> dict:
    # "0" (like unset) leaves discovery on
    return json.loads(run_python(DISCOVERY, plugin_site, env={DISABLE_ENV: "0"}).stdout)


def test_plugins_are_found_lazily_with_their_distribution(discovery: dict) -> None:
    out = discovery
    # nothing is imported by `import mmgpt`; the first lookup imports the plugins
    assert out["loaded_before"] == []
    assert {"mmgpt_fixture_good", "mmgpt_fixture_good.hooks"} <= set(out["loaded_after"])
    assert out["encoder_sizes"] == [3, 5]  # create() passed the kwargs through
    assert out["metric"] == {"exact_match": 0.5}
    assert out["hook_objective"] == ["fixture-objective", {"x": 1}]
    dists = out["distributions"]
    assert dists["encoder:fixture-encoder"] == GOOD
    assert dists["metric:fixture-exact-match"] == GOOD
    assert dists["objective:fixture-objective"] == GOOD  # registered by a module:function hook
    # built-ins, and mmgpt's own plugins found through the same entry-point group
    assert dists["model:gpt-nano"] == "mmgpt"
    assert dists["tokenizer:bpe"] == "mmgpt"


def test_broken_plugin_is_reported_and_isolated(discovery: dict) -> None:
    out = discovery
    assert out["errors"] == [
        [
            "fixture_broken",
            BROKEN,
            "ImportError: mmgpt_fixture_broken needs a library that is not installed",
        ]
    ]
    [(category, message)] = out["warnings"]
    assert category == "RuntimeWarning"
    assert "'fixture_broken'" in message and f"'{BROKEN}'" in message and "ImportError" in message
    # what it registered before failing is dropped with it; everything else still works,
    # including the entries of the plugin it imported while failing (credited to their own
    # distribution, and not reloaded later since that package is already imported)
    assert "metric:fixture-half-registered" not in out["distributions"]
    assert out["distributions"]["encoder:fixture-encoder"] == GOOD
    assert out["distributions"]["metric:fixture-exact-match"] == GOOD
    assert out["distributions"]["model:gpt-nano"] == "mmgpt"
    # an unknown-name error points at the plugin that failed to load
    assert f"{BROKEN}:fixture_broken" in out["unknown_error"]


def test_directly_imported_plugin_keeps_its_distribution(plugin_site: str) -> None:
    code = """
        import mmgpt_fixture_good  # imported by user code before any lookup
        from mmgpt.registry import REGISTRY
        print(REGISTRY.distribution_of("encoder", "fixture-encoder"))
    """
    assert run_python(code, plugin_site).stdout.strip() == GOOD


def test_disable_env_turns_discovery_off(plugin_site: str) -> None:
    code = """
        import json, sys
        import mmgpt.registry as r
        print(json.dumps({
            "encoders": r.names("encoder"),
            "has_preset": "gpt-nano" in r.names("model"),
            "errors": len(r.REGISTRY.plugin_errors),
            "imported": sorted(m for m in sys.modules if m.startswith("mmgpt_fixture")),
        }))
    """
    out = json.loads(run_python(code, plugin_site, env={DISABLE_ENV: "1"}).stdout)
    # mmgpt's own plugins still load (the shipped models need them): its encoders are "vit",
    # "clip" and "siglip" (mmgpt_vit)
    expected = {"encoders": ["clip", "siglip", "vit"], "has_preset": True}
    assert out == {**expected, "errors": 0, "imported": []}


def test_plugins_list_shows_kind_name_and_distribution(plugin_site: str) -> None:
    result = run_python("", plugin_site, args=["-m", "mmgpt", "plugins", "list"])
    table, _, failed = result.stdout.partition("\nplugins that failed to load:\n")
    lines = table.strip().splitlines()
    header = lines[0]
    assert header.split() == ["KIND", "NAME", "DISTRIBUTION"]
    rows = [tuple(line.split()) for line in lines[1:]]
    for row in [
        ("encoder", "fixture-encoder", GOOD),
        ("metric", "fixture-exact-match", GOOD),
        ("objective", "fixture-objective", GOOD),
        ("model", "gpt-nano", "mmgpt"),
        ("tokenizer", "bpe", "mmgpt"),
    ]:
        assert row in rows
    # aligned columns
    for line in lines[1:]:
        kind, name, dist = line.split()
        assert line.index(name, len(kind)) == header.index("NAME")
        assert line.rindex(dist) == header.index("DISTRIBUTION")
    assert f"{BROKEN} (entry point 'fixture_broken'): ImportError" in failed
    assert "RuntimeWarning" not in result.stderr  # said once, in the listing


def test_override_replacing_an_entry_logs_a_warning(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = object(), object()
    registry.register("metric", "score", first)
    with caplog.at_level("WARNING", logger="mmgpt.registry"):
        registry.register("metric", "score", first, override=True)  # the same object: silent
        assert caplog.records == []
        registry.register("metric", "score", second, override=True)
    [record] = caplog.records
    assert record.levelname == "WARNING" and record.name == "mmgpt.registry"
    assert "metric 'score'" in record.getMessage() and "replaces" in record.getMessage()
    assert registry.get("metric", "score") is second


# -- plugins that misbehave ------------------------------------------------------------------
def fake_distribution(site: Path, dist: str, entry_points: dict[str, str], module: str, code: str):
    """An installed distribution as importlib.metadata sees one: a dist-info folder with its
    entry points, and the plugin's module next to it (no build, no pip)."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mmgpt.plugins]\n{lines}")
    (site / f"{module}.py").write_text(textwrap.dedent(code))


SHADOW, EXITER = "mmgpt-shadow", "mmgpt-exiter"


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two plugins found before mmgpt's own (they come first on the path): one registers the
    built-in tokenizer name "bpe", the other calls sys.exit at import."""
    site = tmp_path_factory.mktemp("hostile")
    shadow = """
        from mmgpt.registry import register

        register("metric", "shadow-metric", len)  # dropped when the plugin fails


        @register("tokenizer", "bpe")
        def fake_bpe(**kwargs):
            raise RuntimeError("not mmgpt's tokenizer")
    """
    fake_distribution(
        site, SHADOW, {"shadow": "mmgpt_shadow_plugin"}, "mmgpt_shadow_plugin", shadow
    )
    exiter = "import sys\n\nsys.exit(3)\n"
    fake_distribution(
        site, EXITER, {"exiter": "mmgpt_exiter_plugin"}, "mmgpt_exiter_plugin", exiter
    )
    return str(site)


HOSTILE = """
    import json, sys, warnings
    import mmgpt.registry as r
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r.names("tokenizer")  # the first lookup loads the plugins
    tokenizer = ""
    if "--shipped-model" in sys.argv:
        from mmgpt.demo import default_model_dir
        from mmgpt.multimodal import MultimodalGPT

        tokenizer = type(MultimodalGPT.from_pretrained(default_model_dir()).tokenizer).__module__
    print(json.dumps({
        "bpe": [r.REGISTRY.distribution_of("tokenizer", "bpe"), r.get("tokenizer", "bpe").__module__],
        "tokenizer": tokenizer,
        "metrics": r.names("metric"),
        "errors": [[e.entry_point, e.distribution, e.error] for e in r.REGISTRY.plugin_errors],
        "skipped": r.REGISTRY.skipped_plugins,
        "warnings": [str(w.message) for w in caught],
        "imported": sorted(m for m in sys.modules if m.startswith(("mmgpt_shadow", "mmgpt_exit"))),
    }))
"""


def test_a_plugin_taking_a_builtin_name_fails_alone(hostile_site: str) -> None:
    args = ["-c", textwrap.dedent(HOSTILE), "--shipped-model"]
    out = json.loads(run_python("", hostile_site, args=args).stdout)
    # mmgpt's own tokenizer kept its name, so the shipped model loads
    assert out["bpe"][0] == "mmgpt" and out["bpe"][1].startswith("mmgpt_text")
    assert out["tokenizer"].startswith("mmgpt_text")
    assert "shadow-metric" not in out["metrics"]  # the newcomer is rolled back whole
    errors = {e[0]: e for e in out["errors"]}
    assert set(errors) == {"shadow", "exiter"}  # nothing of mmgpt's failed
    _, dist, error = errors["shadow"]
    assert dist == SHADOW and error.startswith("RegistryError: tokenizer 'bpe'")
    # the message names both distributions: the holder and the newcomer
    assert "registered by distribution 'mmgpt'" in error and f"distribution '{SHADOW}'" in error
    # sys.exit at import is a plugin error like any other, not the end of the program
    assert errors["exiter"] == ["exiter", EXITER, "SystemExit: 3"]
    assert any(f"'{EXITER}' failed to load: SystemExit: 3" in w for w in out["warnings"])


def test_a_plugin_calling_sys_exit_does_not_end_plugins_list(hostile_site: str) -> None:
    result = run_python("", hostile_site, args=["-m", "mmgpt", "plugins", "list"])
    table, _, failed = result.stdout.partition("\nplugins that failed to load:\n")
    assert ("tokenizer", "bpe", "mmgpt") in [tuple(line.split()) for line in table.splitlines()]
    assert f"{EXITER} (entry point 'exiter'): SystemExit: 3" in failed
    assert f"{SHADOW} (entry point 'shadow'): RegistryError" in failed


def test_skip_env_leaves_plugins_out_by_entry_point_or_distribution(hostile_site: str) -> None:
    # "mmgpt_shadow" matches the distribution "mmgpt-shadow" as pip would; "text" names a
    # built-in plugin, which is never skipped
    env = {SKIP_ENV: "exiter, mmgpt_shadow,text"}
    out = json.loads(run_python(HOSTILE, hostile_site, env=env).stdout)
    assert out["errors"] == [] and out["imported"] == []
    assert sorted(out["skipped"]) == [f"{EXITER}:exiter", f"{SHADOW}:shadow"]
    assert out["bpe"][0] == "mmgpt" and out["bpe"][1].startswith("mmgpt_text")


def test_keyboard_interrupt_in_a_plugin_is_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import EntryPoint

    (tmp_path / "mmgpt_ctrl_c_plugin.py").write_text("raise KeyboardInterrupt\n")
    (tmp_path / "mmgpt_exit_plugin.py").write_text("raise SystemExit('bye')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(SKIP_ENV, raising=False)
    group = "mmgpt.plugins"
    eps = [EntryPoint("exit", "mmgpt_exit_plugin", group)]
    monkeypatch.setattr(mmgpt.registry, "_plugin_entry_points", lambda: eps)
    registry = Registry()
    with pytest.warns(RuntimeWarning, match="'exit' from distribution 'unknown'.*SystemExit: bye"):
        assert registry.plugin_errors == [PluginError("exit", "unknown", "SystemExit: bye")]
    eps[:] = [EntryPoint("ctrl-c", "mmgpt_ctrl_c_plugin", group)]
    with pytest.raises(KeyboardInterrupt):
        Registry().names("metric")  # Ctrl-C during discovery still stops the program
