"""The one registry of mmgpt: flat kinds, decorator registration, entry-point plugins.

Components register themselves with ``@register(kind, name)``. Third-party packages (and
mmgpt's own built-in plugins) declare an entry point in the group ``mmgpt.plugins``; the
group is loaded lazily on the first lookup, so ``import mmgpt`` stays light.

mmgpt's own plugins (``text``, ``vit``, ``diffusion``) always load first, so that a
third-party plugin taking one of their names fails alone instead of knocking them out.
Each plugin's import is isolated: whatever it raises (``SystemExit`` included, only
``KeyboardInterrupt`` excepted) is reported with its distribution.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

ENTRY_POINT_GROUP = "mmgpt.plugins"
DISABLE_ENV = "MMGPT_DISABLE_PLUGIN_AUTOLOAD"
# Comma-separated entry-point names or distribution names of third-party plugins not to load.
SKIP_ENV = "MMGPT_SKIP_PLUGINS"
KINDS = (
    "tokenizer",
    "encoder",
    "projector",
    "decoder",
    "adapter",
    "objective",
    "dataset",
    "model",
    "metric",
    "loader",
)
# mmgpt modules whose import registers built-in (non-plugin) entries. Imported on first
# lookup rather than with `import mmgpt`, because several of them import torch.
BUILTIN_MODULES = (
    "mmgpt.presets",
    "mmgpt.objectives",
    "mmgpt.data",
    "mmgpt.projectors",
    "mmgpt.adapters",
    "mmgpt.eval",
)
# mmgpt's own plugins (entry-point name → module), shipped in the mmgpt distribution. They are
# imported directly, before any entry point and whatever the environment says: the shipped
# models need them, and a third-party plugin must not be able to take their names first.
BUILTIN_PLUGINS = {"text": "mmgpt_text", "vit": "mmgpt_vit", "diffusion": "mmgpt_diffusion"}
BUILTIN_DISTRIBUTION = "mmgpt"

logger = logging.getLogger("mmgpt.registry")


class RegistryError(KeyError):
    """An unknown, duplicate or malformed registry entry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Any
    distribution: str  # the installed distribution that supplied the entry


@dataclass(frozen=True)
class PluginError:
    entry_point: str
    distribution: str
    error: str


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._plugin_errors: list[PluginError] = []
        self._skipped: list[str] = []
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()
        # The distribution of the entry point being loaded; None outside entry-point loading,
        # where the distribution is inferred from the registered object's module on demand.
        self._current_dist: str | None = None
        # top-level package of each plugin entry point → its distribution
        self._plugin_packages: dict[str, str] = {}

    # -- registration ---------------------------------------------------------------
    def register(self, kind: str, name: str, obj: Any = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``(kind, name)``; without ``obj`` acts as a decorator."""
        self._check_kind(kind)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"registry names must be non-empty strings, got {name!r}")

        def add(target: Any) -> Any:
            with self._lock:
                existing = self._entries[kind].get(name)
                entry = Entry(kind, name, target, self._supplier(target))
                if existing is not None and existing.obj is not target:
                    holder = self._resolve(existing).distribution
                    newcomer = self._resolve(entry).distribution
                    if not override:
                        raise RegistryError(
                            f"{kind} {name!r} is already registered by distribution "
                            f"{holder!r}; distribution {newcomer!r} cannot register it again "
                            "(pass override=True to replace it)"
                        )
                    # Deliberate, but it silently changes what every model using the name
                    # builds: say so in the log.
                    logger.warning(
                        "%s %r registered by distribution %r replaces the one of "
                        "distribution %r (override=True)",
                        kind,
                        name,
                        newcomer,
                        holder,
                    )
                self._entries[kind][name] = entry
            return target

        return add if obj is None else add(obj)

    def unregister(self, kind: str, name: str) -> None:
        self._check_kind(kind)
        with self._lock:
            self._entries[kind].pop(name, None)

    # -- lookup ---------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        self._check_kind(kind)
        self.load_plugins()
        entry = self._entries[kind].get(name)
        if entry is None:
            known = sorted(self._entries[kind])
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            failed = (
                " (plugins that failed to load: "
                + ", ".join(f"{e.distribution}:{e.entry_point}" for e in self._plugin_errors)
                + ")"
                if self._plugin_errors
                else ""
            )
            raise RegistryError(
                f"unknown {kind} {name!r}; known {kind}s: {', '.join(known) or '(none)'}"
                f"{hint}{failed}"
            )
        return entry.obj

    def create(self, kind: str, name: str, /, **kwargs: Any) -> Any:
        """Build the entry: call it with ``kwargs`` (a class or factory)."""
        obj = self.get(kind, name)
        if not callable(obj):
            raise RegistryError(f"{kind} {name!r} is not callable; use get() instead")
        return obj(**kwargs)

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        self.load_plugins()
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        self.load_plugins()
        kinds = KINDS if kind is None else (kind,)
        for k in kinds:
            self._check_kind(k)
        return [self._resolve(e) for k in kinds for _, e in sorted(self._entries[k].items())]

    def distribution_of(self, kind: str, name: str) -> str:
        self.get(kind, name)
        return self._resolve(self._entries[kind][name]).distribution

    @property
    def plugin_errors(self) -> list[PluginError]:
        self.load_plugins()
        return list(self._plugin_errors)

    @property
    def skipped_plugins(self) -> list[str]:
        """``distribution:entry point`` of the plugins left out through ``MMGPT_SKIP_PLUGINS``."""
        self.load_plugins()
        return list(self._skipped)

    # -- discovery ------------------------------------------------------------------
    def load_plugins(self, *, force: bool = False) -> None:
        """Import built-in modules, mmgpt's own plugins, then the entry points of
        ``mmgpt.plugins`` (once)."""
        with self._lock:
            if (self._loaded and not force) or self._loading:
                return
            self._loading = True
            try:
                # A broken built-in module is a bug in mmgpt: let it raise, and raise again on
                # the next lookup rather than serve a half-filled registry.
                for module in BUILTIN_MODULES:
                    importlib.import_module(module)
                self._loaded = True
                self._plugin_errors.clear()
                self._skipped.clear()
                self._plugin_packages = dict.fromkeys(
                    BUILTIN_PLUGINS.values(), BUILTIN_DISTRIBUTION
                )
                for name, module in BUILTIN_PLUGINS.items():
                    self._load_plugin(name, BUILTIN_DISTRIBUTION, lambda m=module: _import(m))
                if os.environ.get(DISABLE_ENV, "").strip() in ("", "0", "false", "False"):
                    self._load_third_party()
            finally:
                self._loading = False

    def _load_third_party(self) -> None:
        skip = _skip_list()
        eps = []
        for ep in _plugin_entry_points():
            # mmgpt's own entry points: already imported above
            if ep.value in BUILTIN_PLUGINS.values():
                continue
            dist = _dist_name(ep)
            if _normalize(ep.name) in skip or _normalize(dist) in skip:
                self._skipped.append(f"{dist}:{ep.name}")
                logger.info(
                    "mmgpt plugin %r of distribution %r skipped (%s)", ep.name, dist, SKIP_ENV
                )
                continue
            eps.append(ep)
            # a plugin cannot claim the packages of mmgpt's own plugins
            self._plugin_packages.setdefault(ep.module.partition(".")[0], dist)
        for ep in eps:
            self._load_plugin(ep.name, _dist_name(ep), lambda ep=ep: _call_hook(ep.load()))

    def _load_plugin(self, name: str, dist: str, load: Callable[[], None]) -> None:
        before = {k: dict(v) for k, v in self._entries.items()}
        try:
            with self._supplied_by(dist):
                load()
        except KeyboardInterrupt:
            raise
        # A broken plugin must not break the others, nor end the command: SystemExit (a
        # plugin calling sys.exit at import) is caught too.
        except BaseException as exc:
            # Drop what the plugin registered before failing (objects of a half-executed
            # module); keep what other packages it imported registered meanwhile.
            for kind, table in self._entries.items():
                for entry_name, entry in list(table.items()):
                    if entry.distribution == dist and before[kind].get(entry_name) is not entry:
                        if entry_name in before[kind]:
                            table[entry_name] = before[kind][entry_name]
                        else:
                            del table[entry_name]
            error = f"{type(exc).__name__}: {exc}"
            self._plugin_errors.append(PluginError(name, dist, error))
            warnings.warn(
                f"mmgpt plugin {name!r} from distribution {dist!r} failed to load: {error}",
                RuntimeWarning,
                stacklevel=4,
            )

    def _supplier(self, obj: Any) -> str:
        """The distribution to credit for registering ``obj`` now ("" = find out on demand)."""
        package = (getattr(obj, "__module__", None) or "").partition(".")[0]
        if self._current_dist is None:
            # Outside entry-point loading (a module imported directly): attributed by module
            # when someone asks, since that lookup scans every installed distribution.
            return ""
        # A plugin may import another plugin's package (which then registers its own entries):
        # credit those to that package's distribution, everything else to the loading plugin.
        return self._plugin_packages.get(package, self._current_dist)

    def _resolve(self, entry: Entry) -> Entry:
        """Fill in the distribution of an entry registered outside entry-point loading."""
        if entry.distribution:
            return entry
        module = getattr(entry.obj, "__module__", None) or ""
        resolved = Entry(entry.kind, entry.name, entry.obj, _distribution_of_module(module))
        with self._lock:
            if self._entries[entry.kind].get(entry.name) is entry:
                self._entries[entry.kind][entry.name] = resolved
        return resolved

    @contextmanager
    def _supplied_by(self, dist: str) -> Iterator[None]:
        previous, self._current_dist = self._current_dist, dist
        try:
            yield
        finally:
            self._current_dist = previous

    def _check_kind(self, kind: str) -> None:
        if kind not in self._entries:
            raise RegistryError(f"unknown registry kind {kind!r}; kinds are: {', '.join(KINDS)}")


@functools.cache
def _top_level_distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()  # scans every installed distribution: done once, lazily


def _distribution_of_module(module: str) -> str:
    """The distribution that installed ``module``, else its top-level name (e.g. ``__main__``)."""
    top = module.partition(".")[0]
    if top == "mmgpt":
        return "mmgpt"
    dists = _top_level_distributions().get(top)
    return dists[0] if dists else (top or "unknown")


def _import(module: str) -> None:
    importlib.import_module(module)


def _call_hook(loaded: Any) -> None:
    # `module:function` entry points are registration hooks.
    if callable(loaded) and not isinstance(loaded, type):
        loaded()


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "unknown"


def _normalize(name: str) -> str:
    # distribution names compare like pip's: case and -/_/. do not matter
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _skip_list() -> set[str]:
    return {_normalize(n) for n in os.environ.get(SKIP_ENV, "").split(",") if n.strip()}


def _plugin_entry_points() -> list[EntryPoint]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # The same distribution can be visible twice (e.g. editable + site-packages).
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    return unique


REGISTRY = Registry()


def register(kind: str, name: str, obj: Any = None, *, override: bool = False) -> Any:
    """``@register("encoder", "vit")`` — add an entry to the global registry."""
    return REGISTRY.register(kind, name, obj, override=override)


def get(kind: str, name: str) -> Any:
    return REGISTRY.get(kind, name)


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    return REGISTRY.create(kind, name, **kwargs)


def names(kind: str) -> list[str]:
    return REGISTRY.names(kind)


def entries(kind: str | None = None) -> list[Entry]:
    return REGISTRY.entries(kind)


def load_plugins(*, force: bool = False) -> None:
    REGISTRY.load_plugins(force=force)
