"""The core rule: no module of ipfix_balancer.core imports I/O or the clock (time is passed in)."""

import ast
from pathlib import Path

import pytest

import ipfix_balancer.core

CORE = Path(ipfix_balancer.core.__file__).parent
FORBIDDEN = {"socket", "os", "time", "selectors", "signal"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io(path):
    top = {name.split(".")[0] for name in imported_modules(path) if not name.startswith(".")}
    assert not top & FORBIDDEN, f"{path.name} imports {sorted(top & FORBIDDEN)}"
    # inside the package only core itself and the settings it is given: never the I/O half
    relative = {name for name in imported_modules(path) if name.startswith(".")}
    assert relative <= {f".{m.stem}" for m in CORE.glob("*.py")} | {"..config"}, f"{path.name} imports {relative}"


def test_the_rule_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom socket import socket\nfrom ..net import loop\n")
    assert {"time", "socket", "..net"} <= imported_modules(bad)
