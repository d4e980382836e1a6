"""Every registry entry of a kind that ``mmgpt.testing`` checks passes its conformance check.

The parameters come from the registry after plugin loading, so a new entry (built in, a
built-in plugin or an installed third-party plugin) is checked without a test of its own. An
entry is built with its ``conformance_example()`` hook or the kind's small default arguments
(``mmgpt.testing.example_kwargs``); one that cannot be built fails with its ``kind:name``.
"""

from __future__ import annotations

import pytest

from mmgpt.registry import REGISTRY, entries
from mmgpt.testing import CHECKS, check_entry

SWEEP = [
    pytest.param(entry.kind, entry.name, id=f"{entry.kind}:{entry.name}")
    for entry in entries()
    if entry.kind in CHECKS
]


def test_every_plugin_loaded() -> None:
    # a plugin that fails to import drops its entries from the sweep: fail here instead
    assert REGISTRY.plugin_errors == []


def test_the_sweep_covers_every_checked_kind() -> None:
    swept = {param.values[0] for param in SWEEP}
    assert swept == set(CHECKS), f"no registered entry of {sorted(set(CHECKS) - swept)}"


@pytest.mark.parametrize(("kind", "name"), SWEEP)
def test_entry_conforms(kind: str, name: str) -> None:
    check_entry(kind, name)
