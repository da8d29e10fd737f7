"""A real single-node SLURM cluster for the tests, started once per session.

Import the fixture into a test module (`from tests.slurm_fixtures import slurm_cluster`). The
cluster comes from tools/slurm/local_cluster.py, which installs the Debian packages when they
are missing. Tests skip only where SLURM cannot run at all (not root, no dpkg/apt-get); any other
failure to start is an error, so a broken setup never passes as skipped.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

TOOL = ROOT / "tools" / "slurm" / "local_cluster.py"


def load_tool() -> ModuleType:
    """tools/slurm/local_cluster.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("air_local_cluster", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def why_no_slurm(tool: ModuleType) -> str | None:
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (its daemons run as root)"
    if shutil.which("dpkg-query") is None:
        return "no dpkg: SLURM comes from Debian packages here"
    if tool.missing_packages() and shutil.which("apt-get") is None:
        return f"SLURM packages {tool.missing_packages()} are missing and there is no apt-get"
    return None


def _free_port_offset(tool: ModuleType) -> int:
    """An offset at which SLURM's and MariaDB's ports are all free (another cluster may run)."""
    for offset in range(0, 1000, 100):
        ports = [p + offset for p in tool.PORTS.values()]
        if all(_port_free(p) for p in ports):
            return offset
    raise RuntimeError("no free block of ports for a test SLURM cluster")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Cluster:
    root: Path
    conf: Path  # $SLURM_CONF for every SLURM command and job of this session
    tool: ModuleType


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Start the cluster (installing packages if needed), point SLURM_CONF at it, stop it after."""
    tool = load_tool()
    reason = why_no_slurm(tool)
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    layout = tool.start(root, port_offset=_free_port_offset(tool))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(layout.conf)  # subprocesses and jobs inherit it
    try:
        yield Cluster(root=root, conf=layout.conf, tool=tool)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        tool.stop(root)
