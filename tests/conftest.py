"""Test setup: `vqcore` importable on its own, and the whole pack importable the way ComfyUI imports it
(by file path, under a package name that is not its folder name)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACK_NAME = "vqcore_pack_under_test"

torch.set_num_threads(2)  # bit parity with the reference depends on the thread count


def import_pack():
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


@pytest.fixture(scope="session")
def pack():
    return import_pack()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """What the documented `python -m vqcore demo-models DIR` writes, once per session, so the tests use exactly the
    files users get."""
    models = tmp_path_factory.mktemp("comfy") / "models"
    result = subprocess.run([sys.executable, "-m", "vqcore", "demo-models", str(models)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert str(models / "vq_models" / "demo-movq.safetensors") in result.stdout  # it lists what it wrote
    return models
