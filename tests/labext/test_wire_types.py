"""The panel's types (``src/wire.ts``) against the TypedDicts they mirror (``common/protocol.py``).

Why: the snapshot the panel draws is the broker's ``Snapshot`` sent as JSON; a field renamed or
added on one side and not the other is a panel that silently shows nothing. Each interface of
``wire.ts`` names the TypedDict it mirrors in its doc comment (``protocol.LeaseView: ...``); their
field names must agree, but for the exceptions listed here with their reason.
"""

from __future__ import annotations

import re
from pathlib import Path

from jupyter_gpu.common import protocol

WIRE = Path(__file__).resolve().parents[2] / "src" / "wire.ts"

# fields of a TypedDict the panel has no use for (they are never in a snapshot, or not shown)
NOT_IN_THE_PANEL = {
    # in a granted request's status (its owner's kernel only), never in a snapshot; how a session is
    # contained is for %gpu status
    "LeaseView": {"gpu_names", "secret", "virtual", "containment", "host_memory_limit"},
    "QueueItem": {"eta_basis"},
}
# fields of an interface that no TypedDict has: what the server extension adds, or older brokers
# sent
NOT_FROM_THE_BROKER = {
    "PoolInfo": {"can_scale"},  # labext/pool_link.py: the pool is scalable and this user may
    "Snapshot": {"state", "me", "token_set"},  # labext/pool_link.py
    "RunView": {"name", "metrics"},  # older brokers' runs
}


def interfaces(text: str) -> dict[str, set[str]]:
    """TypedDict name -> the field names of the ``wire.ts`` interface whose doc comment names
    it."""
    found: dict[str, set[str]] = {}
    pattern = re.compile(
        r"/\*\*\s*\n?\s*\*?\s*protocol\.(\w+)[^*]*(?:\*(?!/)[^*]*)*\*/\s*\n"
        r"export interface \w+ \{\n(?P<body>.*?)\n\}",
        re.DOTALL,
    )
    for match in pattern.finditer(text):
        found[match.group(1)] = set(re.findall(r"^  (\w+)\??:", match.group("body"), re.M))
    ok = re.search(r"state: 'ok';\n(?P<body>.*?)\n    \};", text, re.DOTALL)
    assert ok, "wire.ts's ISnapshot has no 'ok' variant"
    found["Snapshot"] = set(re.findall(r"^      (\w+)\??:", ok.group("body"), re.M)) | {"state"}
    return found


def test_the_panels_types_mirror_the_protocol():
    mirrored = interfaces(WIRE.read_text())
    assert len(mirrored) >= 15, sorted(mirrored)  # the parser found the interfaces
    for name, ts_fields in sorted(mirrored.items()):
        typed = getattr(protocol, name, None)
        assert isinstance(typed, type) and issubclass(typed, dict), f"no TypedDict {name}"
        py_fields = set(typed.__annotations__) | {
            k for base in typed.__mro__ for k in getattr(base, "__annotations__", {})
        }
        extra = ts_fields - py_fields - NOT_FROM_THE_BROKER.get(name, set())
        assert not extra, f"wire.ts reads {sorted(extra)} of {name}, which the broker never sends"
        missing = py_fields - ts_fields - NOT_IN_THE_PANEL.get(name, set())
        assert not missing, f"{name} has {sorted(missing)}: add them to wire.ts (or say why not)"


def test_the_comparison_finds_drift():
    """The check above must be able to fail: a field only one side knows."""
    text = WIRE.read_text().replace("  preempted?: boolean;\n", "  preemptd?: boolean;\n", 1)
    lease = interfaces(text)["LeaseView"]
    assert "preemptd" in lease and "preempted" not in lease
