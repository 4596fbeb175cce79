"""The folders keep their one-way flow: these fail on an import that crosses it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# pynetdicom modules whose contents are not its public API: only node/receive/fastpath may use them.
PYNETDICOM_INTERNALS = (
    "pynetdicom.acse",
    "pynetdicom.association",
    "pynetdicom.dimse",
    "pynetdicom.dimse_messages",
    "pynetdicom.dsutils",
    "pynetdicom.dul",
    "pynetdicom.fsm",
    "pynetdicom.pdu",
    "pynetdicom.pdu_items",
    "pynetdicom.pdu_primitives",
    "pynetdicom.timer",
)


def imports(package: str) -> list[tuple[Path, str]]:
    """(file, imported module) for every import in ``package``'s files, lazy imports included."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found += [(path, node.module)]
                found += [(path, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def test_node_never_imports_workers() -> None:
    assert [(p.name, m) for p, m in imports("node") if _within(m, "workers")] == []


def test_segmenters_import_neither_node_nor_workers() -> None:
    assert [(p.name, m) for p, m in imports("segmenters") if _within(m, "node", "workers")] == []


def test_workers_use_only_the_shared_core_of_node() -> None:
    crossing = [
        (p.name, m)
        for p, m in imports("workers")
        if _within(m, "node") and not _within(m, "node.core", "node.db")
    ]
    assert crossing == []


@pytest.mark.parametrize("package", ["node", "workers", "segmenters"])
def test_pynetdicom_internals_only_in_the_fast_path(package: str) -> None:
    fast_path = ROOT / "node" / "receive" / "fastpath"
    leaning = [
        (p.relative_to(ROOT).as_posix(), m)
        for p, m in imports(package)
        if _within(m, *PYNETDICOM_INTERNALS) and fast_path not in p.parents
    ]
    assert leaning == []


def test_the_layout_test_sees_imports() -> None:
    # A scan that found nothing would pass every test above.
    found = {m for _, m in imports("node")}
    assert "pynetdicom.dul" in found and "node.core.config" in found
