"""Shared pieces of the node tests: demo models written by the CLI, and switching the pack's host adapter."""

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_demo_models(models_dir: Path):
    """Runs the documented command, so the tests use exactly the files users get."""
    subprocess.run([sys.executable, "-m", "vqcore", "demo-models", str(models_dir)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return models_dir


def host_module(pack):
    return sys.modules[f"{pack.__name__}.nodes.host"]


@contextmanager
def bound_host(pack, **modules):
    """Binds the pack's host adapter to the given modules (none: plain torch) and restores plain torch after."""
    host = host_module(pack)
    host.bind(**modules)
    try:
        yield host
    finally:
        host.bind()


@contextmanager
def plain_host(pack, models_dir):
    """Plain-torch host reading models from models_dir."""
    host = host_module(pack)
    with bound_host(pack, folder_paths=host.PlainFolders(models_dir)) as bound:
        yield bound


_written = {}


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """The demo-model command's output, written once per test session (the test modules share it)."""
    if "models" not in _written:
        _written["models"] = write_demo_models(tmp_path_factory.mktemp("comfy") / "models")
    return _written["models"]
