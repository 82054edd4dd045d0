"""Every API-format example workflow runs through the pack's node classes (plain-torch host, the demo-model command's
files) with shapes, ranges and determinism checked; each UI-format twin describes the same graph.

UI-format workflows are example_workflows/<name>.json (ComfyUI lists them as templates); their API-format twins are
example_workflows/api/<name>.json, a subfolder the template browser does not list."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nodes_support import plain_host
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
API_FILES = sorted(WORKFLOWS.glob("api/*.json"))


# ---- ComfyUI core nodes used by the examples, reduced to their documented behaviour (nodes.py, nodes_mask.py) ----

class EmptyImage:
    def run(self, width, height, batch_size=1, color=0):
        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        return (torch.tensor(rgb).expand(batch_size, height, width, 3).clone(),)


class LoadImage:
    def run(self, image, input_dir):
        with Image.open(input_dir / image) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)
        return pixels[None], torch.zeros(1, *pixels.shape[:2])


class ImageScaleBy:
    def run(self, image, upscale_method, scale_by):
        assert upscale_method == "lanczos", "the stand-in implements what the examples use"
        pictures = [Image.fromarray((item.numpy() * 255).round().astype(np.uint8)) for item in image]
        size = (round(image.shape[2] * scale_by), round(image.shape[1] * scale_by))
        return (torch.stack([torch.from_numpy(np.asarray(p.resize(size, Image.LANCZOS), dtype=np.float32) / 255)
                             for p in pictures]),)


class SolidMask:
    def run(self, value, width, height):
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class MaskComposite:
    def run(self, destination, source, x, y, operation):
        assert operation == "add", "the stand-in implements what the examples use"
        out = destination.clone()
        h, w = min(source.shape[-2], out.shape[-2] - y), min(source.shape[-1], out.shape[-1] - x)
        out[:, y:y + h, x:x + w] = (out[:, y:y + h, x:x + w] + source[:, :h, :w]).clamp(0, 1)
        return (out,)


class VAEEncode:
    def run(self, pixels, vae):
        return ({"samples": vae.encode(pixels[:, :, :, :3])},)


class VAEDecode:
    def run(self, samples, vae):
        return (vae.decode(samples["samples"]),)


class SaveImage:
    def run(self, images, filename_prefix="ComfyUI"):
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png"} for i in range(len(images))]},
                "result": (images,)}


CORE_NODES = {cls.__name__: cls for cls in (EmptyImage, LoadImage, ImageScaleBy, SolidMask, MaskComposite, VAEEncode,
                                            VAEDecode, SaveImage)}


def topological_order(prompt):
    order, done = [], set()

    def visit(node_id, path=()):
        assert node_id not in path, f"cycle through node {node_id}"
        if node_id in done:
            return
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                visit(value[0], path + (node_id,))
        done.add(node_id)
        order.append(node_id)

    for node_id in prompt:
        visit(node_id)
    return order


def check_widget(pack_cls, name, value, node_id):
    """What ComfyUI validates before running: combo values listed, numbers within min/max."""
    spec = {**pack_cls.INPUT_TYPES().get("required", {}), **pack_cls.INPUT_TYPES().get("optional", {})}
    assert name in spec, f"node {node_id}: unknown input {name}"
    kind, *options = spec[name]
    options = options[0] if options else {}
    if isinstance(kind, list):
        assert value in kind, f"node {node_id}: {name}={value!r} is not among {kind}"
    elif kind in ("INT", "FLOAT"):
        assert options.get("min", -float("inf")) <= value <= options.get("max", float("inf")), (node_id, name)


def run_workflow(pack, prompt, input_dir):
    """Executes an API-format prompt (LoadImage reads from input_dir); returns {node_id: (outputs, ui)}."""
    results = {}
    for node_id in topological_order(prompt):
        node = prompt[node_id]
        kwargs = {}
        pack_cls = pack.NODE_CLASS_MAPPINGS.get(node["class_type"])
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                kwargs[name] = results[value[0]][0][value[1]]
            else:
                if pack_cls is not None:
                    check_widget(pack_cls, name, value, node_id)
                kwargs[name] = value
        if pack_cls is not None:
            out = getattr(pack_cls(), pack_cls.FUNCTION)(**kwargs)
        else:
            if node["class_type"] == "LoadImage":
                kwargs["input_dir"] = input_dir
            out = CORE_NODES[node["class_type"]]().run(**kwargs)
        ui = out.get("ui") if isinstance(out, dict) else None
        outputs = out["result"] if isinstance(out, dict) else out
        if pack_cls is not None:
            assert len(outputs) == len(pack_cls.RETURN_TYPES)
        results[node_id] = (outputs, ui)
    return results


def saved_images(prompt, results):
    return {node_id: results[node_id][0][0] for node_id, node in prompt.items() if node["class_type"] == "SaveImage"}


def expected_size(prompt, results):
    """(H, W) of the workflow's input picture: its EmptyImage, or its loaded photo after any scaling (None for
    pictures the sampler makes)."""
    for kind in ("ImageScaleBy", "LoadImage", "EmptyImage"):
        for node_id, node in prompt.items():
            if node["class_type"] == kind:
                return tuple(results[node_id][0][0].shape[1:3])
    return None


def test_every_workflow_has_both_formats():
    ui_files = {p.stem for p in WORKFLOWS.glob("*.json")}
    api_files = {p.stem for p in API_FILES}
    assert ui_files == api_files and len(api_files) >= 4, (ui_files, api_files)
    for path in WORKFLOWS.glob("*.json"):
        assert "nodes" in json.loads(path.read_text()), f"{path.name} is listed as a template but is not UI format"


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.name)
def test_example_workflow_runs_and_is_deterministic(pack, demo_models, api_file):
    prompt = json.loads(api_file.read_text())
    input_dir = demo_models.parent / "input"  # where demo-models writes the photo
    with plain_host(pack, demo_models):
        results = run_workflow(pack, prompt, input_dir)
        first = saved_images(prompt, results)
        second = saved_images(prompt, run_workflow(pack, prompt, input_dir))
    check_inpainting_keeps_unmasked_tokens(prompt, results)
    assert first, "the workflow saves no image"
    size = expected_size(prompt, results)
    for node_id, image in first.items():
        assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[-1] == 3, (node_id, image.shape)
        if size is not None:
            assert tuple(image.shape[1:3]) == size, (node_id, image.shape, size)
        assert 0 <= image.min() and image.max() <= 1 and torch.isfinite(image).all()
        assert torch.equal(image, second[node_id]), f"node {node_id}: a second run gave a different image"


def check_inpainting_keeps_unmasked_tokens(prompt, results):
    """A sampler given tokens and a mask changes tokens only where the mask (scaled to the token grid) is set."""
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] != "VQCoreVQDiffusionSampler" or "mask" not in inputs:
            continue
        given = results[inputs["tokens"][0]][0][inputs["tokens"][1]]["indices"]
        mask = results[inputs["mask"][0]][0][inputs["mask"][1]]
        out = results[node_id][0][0]["indices"]
        factor = mask.shape[-1] // out.shape[-1]
        masked = torch.nn.functional.max_pool2d(mask[:, None], factor)[:, 0] > 0.5
        assert masked.any() and not masked.all(), "the example should mask part of the image"
        assert torch.equal(out[~masked.expand_as(out)], given.expand_as(out)[~masked.expand_as(out)])


def ui_graph(ui):
    """(node id → type, widget values) and links as (source id, slot, target id, target input name)."""
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    links = set()
    for link_id, src, src_slot, dst, dst_slot, _type in ui["links"]:
        links.add((str(src), src_slot, str(dst), nodes[str(dst)]["inputs"][dst_slot]["name"]))
    return nodes, links


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.name)
def test_ui_and_api_twins_describe_the_same_graph(pack, api_file):
    api = json.loads(api_file.read_text())
    ui = json.loads((WORKFLOWS / api_file.name).read_text())
    nodes, ui_links = ui_graph(ui)
    assert {k: n["type"] for k, n in nodes.items()} == {k: n["class_type"] for k, n in api.items()}
    api_links = {(v[0], v[1], node_id, name) for node_id, node in api.items()
                 for name, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links
    for node_id, node in api.items():
        widgets = [v for v in node["inputs"].values() if not isinstance(v, list)]
        values = [v for v in nodes[node_id]["widgets_values"] if v not in ("fixed", "randomize")]
        assert values == widgets, f"node {node_id}: widget values differ between the twins"
    for link in ui["links"]:  # the link's type is the type of the output it leaves
        src = nodes[str(link[1])]
        assert src["outputs"][link[2]]["type"] == link[5] and link[0] in src["outputs"][link[2]]["links"]
