"""Real-host tests: they need a ComfyUI source checkout in COMFYUI_PATH (installed with setup_comfyui.sh) and
are skipped, with that reason, everywhere else."""

from pathlib import Path

import pytest
from comfy_server import ComfyServer, comfyui_path

SKIP_REASON = ("COMFYUI_PATH is not set to a ComfyUI source tree; real-host tests skipped "
               "(see tests/integration/setup_comfyui.sh)")
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    server = ComfyServer(comfyui_path(), tmp_path_factory.mktemp("comfyui_base"))
    server.prepare()
    server.start()
    try:
        yield server
    finally:
        server.stop()

