"""For scripts/: re-run a script with the repository's .venv when started by a python3 without the test
dependencies (Debian's own, say). Standard library only, so any python3 can import it."""

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_repo_venv(script: str, modules=("psutil", "scapy")) -> None:
    """Return when ``modules`` import here; else exec ``script`` with .venv/bin/python (made by
    scripts/install-deps). Raises ImportError when that is this interpreter already or missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    venv_python = REPO / ".venv" / "bin" / "python"
    if not venv_python.exists() or Path(sys.prefix).resolve() == venv_python.parents[1].resolve():
        raise ImportError(f"{', '.join(missing)} missing: run scripts/install-deps first")
    os.execv(str(venv_python), [str(venv_python), str(Path(script).resolve()), *sys.argv[1:]])
