"""The pack inside a real ComfyUI server: import, node definitions, templates, front-end files, example
workflows through POST /prompt, validation and runtime errors, interrupt, and ComfyUI's own VAE nodes."""

import io
import re
import time
import urllib.error
import urllib.parse

import pytest
from comfy_server import OPENER, PACK_FOLDER, RequestError
from PIL import Image
from workflows import (
    api_workflows,
    build_node,
    combo_options,
    is_api_format,
    is_ui_format,
    load_json,
    ui_workflows,
)

# Node ids agreed for the pack; every one must reach the host.
CONTRACT_NODES = [
    "VQCoreLoadVQModel", "VQCoreLoadAutoencoderKL", "VQCoreEncode", "VQCoreDecode", "VQCoreTiledVAEDecode",
    "VQCoreTiledVAEEncode", "VQCoreLoadVQDiffusion", "VQCoreCLIPTextEncode", "VQCoreVQDiffusionSampler",
    "VQCoreTruncation", "VQCoreSeamlessVAE",
]
PROMPT_TIMEOUT = 300


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get("/object_info")


def our_node_ids(prompt):
    return [nid for nid, node in prompt.items() if node["class_type"].startswith("VQCore")]


def view_image(comfy, image_ref) -> Image.Image:
    query = urllib.parse.urlencode({k: image_ref[k] for k in ("filename", "subfolder", "type")})
    with OPENER.open(f"{comfy.url}/view?{query}", timeout=30) as response:
        return Image.open(io.BytesIO(response.read()))


def test_pack_imports_without_failure(comfy):
    log = comfy.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    assert not failed, "\n".join(failed)
    assert re.search(rf"seconds: .*custom_nodes[/\\]{re.escape(PACK_FOLDER)}\s*$", log, re.MULTILINE), log[-3000:]


def test_every_node_registered_with_declared_inputs_and_outputs(object_info, pack):
    assert sorted(set(CONTRACT_NODES) - set(object_info)) == []
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        info = object_info[node_id]
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            served = info["input"].get(section, {})
            assert list(served) == list(declared.get(section, {})), (node_id, section)
            for name, spec in declared.get(section, {}).items():
                if combo_options(spec) is None:
                    assert served[name][0] == spec[0], (node_id, name)
        assert info["output"] == list(cls.RETURN_TYPES), node_id
        assert info["output_name"] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)), node_id
        assert info["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id], node_id
        assert info["python_module"] == f"custom_nodes.{PACK_FOLDER}", node_id
        assert info["description"], f"{node_id} has no DESCRIPTION"


def help_page(comfy, node_id):
    """A node's help page by the paths ComfyUI's front end asks for, in its order: docs/<id>/en.md, then docs/<id>.md."""
    for page in (f"{node_id}/en.md", f"{node_id}.md"):
        try:
            with OPENER.open(f"{comfy.url}/extensions/{PACK_FOLDER}/docs/{page}", timeout=30) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
    raise AssertionError(f"no help page for {node_id} (docs/{node_id}/en.md or docs/{node_id}.md)")


def test_front_end_files_and_node_docs_are_served(comfy, pack):
    extensions = comfy.get("/extensions")
    assert f"/extensions/{PACK_FOLDER}/vqcore_extension.js" in extensions
    assert f"/extensions/{PACK_FOLDER}/vqcore_panels.js" in extensions
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        doc = help_page(comfy, node_id)
        declared = cls.INPUT_TYPES()
        names = [*declared["required"], *declared.get("optional", {}), *getattr(cls, "RETURN_NAMES", ())]
        missing = [name for name in names if f"`{name}`" not in doc]
        assert not missing, f"docs/{node_id}.md does not describe {missing}"


def test_example_workflows_are_listed_as_templates(comfy):
    names = sorted(p.stem for p in ui_workflows())
    assert names, "example_workflows/ has no UI-format workflow"
    listed = comfy.get("/workflow_templates").get(PACK_FOLDER, [])
    # Everything the template browser offers must open as a UI workflow; an API-format file there fails to
    # open in the front end ("nodes is not iterable"). API twins belong in example_workflows/api/.
    not_ui = [name for name in listed if not is_ui_format(
        comfy.get(f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}.json"))]
    assert not_ui == [], f"listed as templates but not UI-format workflows: {not_ui}"
    assert sorted(listed) == names


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.stem)
def test_template_thumbnail_is_served(comfy, path):
    """The template browser shows <name>.jpg beside each template (tools/make_thumbnails.py writes them)."""
    url = f"{comfy.url}/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(path.stem)}.jpg"
    with OPENER.open(url, timeout=30) as response:
        image = Image.open(io.BytesIO(response.read()))
    assert image.format == "JPEG" and min(image.size) > 0, path.name


def test_every_ui_workflow_has_an_api_twin():
    api_names = {p.name.removesuffix(".api.json").removesuffix(".json") for p in api_workflows()}
    assert {p.stem for p in ui_workflows()} <= api_names


@pytest.mark.parametrize("path", api_workflows(), ids=lambda p: p.name)
def test_api_example_workflow_completes(comfy, object_info, path):
    prompt = load_json(path)
    assert is_api_format(prompt), path
    assert our_node_ids(prompt), f"{path.name} uses none of our nodes"
    entry = comfy.run_prompt(prompt, PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    output_nodes = [nid for nid, node in prompt.items() if object_info[node["class_type"]].get("output_node")]
    assert output_nodes, f"{path.name} has no output node"
    for nid in output_nodes:
        assert entry["outputs"].get(nid), f"no output from node {nid} ({prompt[nid]['class_type']})"
        for image_ref in entry["outputs"][nid].get("images", []):
            image = view_image(comfy, image_ref)
            assert min(image.size) >= 8


def test_invalid_input_is_rejected_naming_our_node(comfy, object_info):
    prompt = load_json(api_workflows()[0])
    target, name = next((nid, name) for nid in our_node_ids(prompt)
                        for name, spec in object_info[prompt[nid]["class_type"]]["input"]["required"].items()
                        if combo_options(spec) is not None and isinstance(prompt[nid]["inputs"].get(name), str))
    prompt[target]["inputs"][name] = "no-such-model.safetensors"
    with pytest.raises(RequestError) as excinfo:
        comfy.post("/prompt", {"prompt": prompt, "client_id": comfy.client_id})
    assert excinfo.value.status == 400
    errors = excinfo.value.body["node_errors"]
    assert errors[target]["class_type"] == prompt[target]["class_type"]
    assert any(e["type"] == "value_not_in_list" and e["extra_info"]["input_name"] == name
               for e in errors[target]["errors"]), errors


def vq_decode_prompt(object_info, latent_node):
    """Load VQModel → VQ Decode of the given latent node's output → PreviewImage."""
    return {
        "1": build_node(object_info, "VQCoreLoadVQModel", {}),
        "2": latent_node,
        "3": build_node(object_info, "VQCoreDecode", {"VQ_VAE": ["1", 0]}, {"samples": ["2", 0]}),
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_runtime_error_is_reported_and_the_next_prompt_runs(comfy, object_info):
    # A 16-channel latent cannot belong to the demo VQ model: our decode node must fail with its own error.
    bad_latent = build_node(object_info, "EmptySD3LatentImage", {}, {"width": 64, "height": 64})
    entry = comfy.run_prompt(vq_decode_prompt(object_info, bad_latent), PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "error"
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "VQCoreDecode", entry["status"]["messages"]
    assert "samples" in errors[0]["exception_message"], errors[0]  # the message names the input at fault

    image = build_node(object_info, "EmptyImage", {}, {"width": 64, "height": 64, "batch_size": 1})
    good = {
        "1": build_node(object_info, "VQCoreLoadVQModel", {}),
        "2": image,
        "3": build_node(object_info, "VQCoreEncode", {"VQ_VAE": ["1", 0], "IMAGE": ["2", 0]}),
        "4": build_node(object_info, "VQCoreDecode", {"VQ_VAE": ["1", 0]}, {"tokens": ["3", 1]}),
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    entry = comfy.run_prompt(good, PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    tokens_ui = entry["outputs"]["3"]["vqcore_tokens"]
    assert tokens_ui[0]["codebook"] > 0 and len(tokens_ui[0]["grid"]) == 2


def test_core_vae_nodes_accept_our_autoencoder_kl(comfy, object_info):
    prompt = {
        "1": build_node(object_info, "VQCoreLoadAutoencoderKL", {}),
        "2": build_node(object_info, "EmptyImage", {}, {"width": 64, "height": 48, "batch_size": 2, "color": 0x4080C0}),
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 0], "tile_size": 64,
                                                         "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    entry = comfy.run_prompt(prompt, PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    for nid in ("6", "7"):
        images = entry["outputs"][nid]["images"]
        assert len(images) == 2
        assert view_image(comfy, images[0]).size == (64, 48)


def long_sampler_prompt():
    """The text-to-image example in `standard` mode (every timestep of the schedule) with a larger batch."""
    path = next(p for p in api_workflows() if any(
        node["class_type"] == "VQCoreVQDiffusionSampler" for node in load_json(p).values()))
    prompt = load_json(path)
    sampler_id = next(nid for nid, node in prompt.items() if node["class_type"] == "VQCoreVQDiffusionSampler")
    prompt[sampler_id]["inputs"].update(sampling_mode="standard", batch_size=8)
    return prompt, sampler_id


def test_interrupt_stops_a_long_sampler_run_within_one_step(comfy):
    prompt, sampler_id = long_sampler_prompt()
    with comfy.websocket() as events:
        prompt_id = comfy.queue_prompt(prompt)
        deadline = time.monotonic() + PROMPT_TIMEOUT
        progress, total = 0, None
        while progress < 3:
            event = events.next_event(deadline)
            assert event["type"] not in ("execution_success", "execution_error"), event
            if event["type"] == "progress" and event["data"].get("node") == sampler_id:
                progress, total = event["data"]["value"], event["data"]["max"]
        comfy.post("/interrupt")
        # The step under way when the flag was set may finish and report; no further step may start.
        at_interrupt, last = progress, progress
        interrupted_at = time.monotonic()
        while True:
            event = events.next_event(interrupted_at + 60)
            if event["type"] == "progress" and event["data"].get("node") == sampler_id:
                last = event["data"]["value"]
            elif event["type"] == "execution_interrupted":
                break
            assert event["type"] not in ("execution_success", "execution_error"), event
    assert last < total, "the sampler ran to the end"
    assert last - at_interrupt <= 1, f"progress went from {at_interrupt} to {last} of {total} after the interrupt"
    entry = comfy.wait_for_history(prompt_id, 60)
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    # and the server still serves prompts
    assert comfy.get("/queue")["queue_running"] == []
