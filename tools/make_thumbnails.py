"""Writes example_workflows/<name>.jpg, the template browser's thumbnail, from each example workflow's real output:
its API twin (example_workflows/api/<name>.json) runs in a real ComfyUI server with the demo models, and the first
image its last SaveImage node wrote becomes the thumbnail, scaled to THUMBNAIL_PX on its longer side. Re-run it
whenever a workflow or a demo model changes:

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/env/bin/python python tools/make_thumbnails.py [NAME...]

COMFYUI_PYTHON is the environment tests/integration/setup_comfyui.sh prints; without NAMEs every workflow is done.
"""

import argparse
import io
import sys
import tempfile
import urllib.parse
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from comfy_server import OPENER, ComfyServer, comfyui_path
from workflows import EXAMPLES, load_json, ui_workflows

THUMBNAIL_PX = 256
PROMPT_TIMEOUT = 600


def last_saved_image(server, prompt: dict) -> Image.Image:
    entry = server.run_prompt(prompt, PROMPT_TIMEOUT)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"the workflow failed: {entry['status']['messages']}")
    save_nodes = sorted((nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"), key=int)
    if not save_nodes:
        raise RuntimeError("the workflow has no SaveImage node")
    image_ref = entry["outputs"][save_nodes[-1]]["images"][0]
    query = urllib.parse.urlencode({k: image_ref[k] for k in ("filename", "subfolder", "type")})
    with OPENER.open(f"{server.url}/view?{query}", timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def thumbnail(image: Image.Image) -> Image.Image:
    """Scaled to THUMBNAIL_PX on the longer side; the demo outputs are small, so nearest keeps their pixels sharp."""
    scale = THUMBNAIL_PX / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every UI example workflow)")
    names = parser.parse_args().names or [p.stem for p in ui_workflows()]
    comfy_dir = comfyui_path()
    if comfy_dir is None:
        parser.error("set COMFYUI_PATH to a ComfyUI source tree (and COMFYUI_PYTHON to its environment)")
    with tempfile.TemporaryDirectory(prefix="vqcore-thumbnails-") as base:
        server = ComfyServer(comfy_dir, Path(base))
        server.prepare()
        server.start()
        try:
            for name in names:
                out = EXAMPLES / f"{name}.jpg"
                thumbnail(last_saved_image(server, load_json(EXAMPLES / "api" / f"{name}.json"))).save(
                    out, quality=85, optimize=True)
                print(f"{out.relative_to(EXAMPLES.parent)}: {out.stat().st_size} bytes")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
