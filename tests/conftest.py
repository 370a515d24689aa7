"""Shared pytest setup: makes ``from ipfixkit import ...`` work from any test
directory (tests/, tests/e2e/) and offers the kit's peers as fixtures."""
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
for path in (TESTS_DIR, TESTS_DIR.parent):   # the kit, and the product package
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import ipfixkit  # noqa: E402


@pytest.fixture
def tcp_sink():
    """A listening :class:`ipfixkit.TcpSink` on a fresh loopback port."""
    with ipfixkit.TcpSink() as sink:
        yield sink


@pytest.fixture
def udp_sink():
    """A bound :class:`ipfixkit.UdpSink` on a fresh loopback port."""
    with ipfixkit.UdpSink() as sink:
        yield sink


@pytest.fixture
def balancer(tmp_path):
    """Factory ``balancer(env_text, **kw) -> Balancer`` (started); all stopped at teardown.

    Each call gets its own sub-directory of ``tmp_path``.
    """
    started = []

    def make(env_text, **kwargs):
        workdir = tmp_path / f"balancer{len(started)}"
        workdir.mkdir()
        b = ipfixkit.Balancer(workdir, env_text, **kwargs)
        started.append(b)
        return b

    yield make
    for b in started:
        b.__exit__(None, None, None)


# -- tiers: `pytest -m "not e2e and not slow"` is the inner loop (README "Development") ---------------------
E2E_DIRS = {"e2e", "noloss", "hostile", "security", "box"}  # real balancer processes and peers
E2E_MODULES = {"test_console_browser.py", "test_console_process.py", "test_readme_quickstart.py"}
SLOW_MODULES = {"test_soak.py", "test_bench.py", "test_packaging.py"}  # a minute of soak, benchmarks, RPM builds


def pytest_collection_modifyitems(config, items):
    """Mark each test by where it lives (and by the ``balancer`` fixture, which starts the real product)."""
    for item in items:
        path = Path(str(item.fspath))
        rel = path.relative_to(TESTS_DIR).parts
        if rel[0] == "box":
            item.add_marker(pytest.mark.box)
        if rel[0] in E2E_DIRS or path.name in E2E_MODULES or "balancer" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
        if path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
