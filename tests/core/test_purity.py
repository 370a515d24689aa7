"""The core rule: no module of ipfix_balancer.core imports I/O or the clock (time is passed in), neither
itself nor through what it imports. Of the rest of the package it may load only the settings model
(``config.model``), and of the outside world only the standard library."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ipfix_balancer

ROOT = Path(ipfix_balancer.__file__).parents[1]  # where ``import ipfix_balancer`` is found
CORE = ROOT / "ipfix_balancer" / "core"
FORBIDDEN = {"socket", "os", "time", "selectors", "signal", "select", "fcntl", "subprocess", "threading", "mmap"}
#: what core may load of its own package; the packages are there because Python runs a package's
#: ``__init__`` before any module in it (so config/__init__ must not import the I/O half either)
ALLOWED = {"{top}", "{top}.core", "{top}.config", "{top}.config.model"}


def module_path(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def imports_of(name: str, root: Path) -> set[str]:
    """The absolute names module ``name`` imports, anywhere in it (an import inside a function runs too),
    with ``from package import submodule`` counted as the submodule."""
    path = module_path(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}", root))
    return found


def loaded_by(name: str, root: Path) -> tuple[set[str], set[str]]:
    """What importing module ``name`` loads, transitively: (modules of its package, with each module's
    parent packages; top-level names of everything outside)."""
    top = name.split(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    todo = [name]
    while todo:
        parts = todo.pop().split(".")
        for module in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if module in inside or module_path(module, root) is None:
                continue
            inside.add(module)
            for imported in imports_of(module, root):
                if imported.split(".")[0] == top:
                    todo.append(imported)
                else:
                    outside.add(imported.split(".")[0])
    return inside, outside


def violations(name: str, root: Path) -> list[str]:
    """Why module ``name`` breaks the core rule (empty: it keeps it)."""
    top = name.split(".")[0]
    inside, outside = loaded_by(name, root)
    allowed = {a.format(top=top) for a in ALLOWED}
    return ([f"loads {m}" for m in sorted(inside) if m not in allowed and not m.startswith(f"{top}.core.")]
            + [f"imports {m}" for m in sorted(outside) if m in FORBIDDEN or m not in sys.stdlib_module_names])


CORE_MODULES = sorted(f"ipfix_balancer.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CORE_MODULES)
def test_core_module_imports_no_io_even_indirectly(name):
    assert violations(name, ROOT) == []


def test_importing_core_loads_only_core_and_the_settings_model():
    """The same rule as Python applies it (dynamic imports included): what a fresh interpreter has loaded."""
    code = (f"import sys; import {', '.join(CORE_MODULES)}; "
            "print(*sorted(m for m in sys.modules if m.split('.')[0] == 'ipfix_balancer'))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert set(CORE_MODULES) <= set(loaded)
    assert [m for m in loaded if not m.startswith("ipfix_balancer.core.")
            and m not in {a.format(top="ipfix_balancer") for a in ALLOWED}] == []


# --- the checker fails on what it must catch -------------------------------------------------------------

def plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CLEAN = {"pkg/__init__.py": "", "pkg/core/__init__.py": "", "pkg/net.py": "import socket\n",
         "pkg/core/a.py": "from __future__ import annotations\nimport enum\nfrom . import b\nfrom .b import f\n",
         "pkg/core/b.py": "from ..config.model import Mode\n\ndef f():\n    return Mode\n",
         "pkg/config/__init__.py": "import importlib\n", "pkg/config/model.py": "import enum\nMode = enum.Enum\n",
         "pkg/config/parse.py": "import os\nimport dotenv\nfrom .model import Mode\n"}


def test_the_checker_passes_a_clean_core(tmp_path):
    plant(tmp_path, CLEAN)
    assert violations("pkg.core.a", tmp_path) == []
    assert loaded_by("pkg.core.a", tmp_path) == (
        {"pkg", "pkg.core", "pkg.core.a", "pkg.core.b", "pkg.config", "pkg.config.model"},
        {"__future__", "enum", "importlib"})


@pytest.mark.parametrize("where, text, found", [
    ("pkg/core/b.py", "import time\n", ["imports time"]),
    ("pkg/core/b.py", "def later():\n    from threading import Thread\n", ["imports threading"]),
    ("pkg/core/b.py", "from select import poll\nimport mmap, fcntl\n", ["imports fcntl", "imports mmap",
                                                                          "imports select"]),
    ("pkg/core/b.py", "from .. import net\n", ["loads pkg.net", "imports socket"]),
    ("pkg/config/model.py", "import subprocess\n", ["imports subprocess"]),  # two steps away from pkg.core.a
    ("pkg/config/__init__.py", "from .parse import load\n",  # an eager re-export: the I/O half comes along
     ["loads pkg.config.parse", "imports dotenv", "imports os"]),
    ("pkg/core/b.py", "import pyroute2\n", ["imports pyroute2"]),  # outside the standard library
])
def test_the_checker_fails_on_a_planted_impure_import(tmp_path, where, text, found):
    plant(tmp_path, {**CLEAN, where: CLEAN[where] + text})
    assert violations("pkg.core.a", tmp_path) == found
