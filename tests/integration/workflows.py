"""The pack's example workflows and the API-format prompts the tests build from them."""

import json
from pathlib import Path

from comfy_server import REPO_ROOT

EXAMPLES = REPO_ROOT / "example_workflows"


def load_json(path: Path):
    return json.loads(path.read_text())


def is_api_format(workflow) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(node, dict) and "class_type" in node for node in workflow.values())


def is_ui_format(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def ui_workflows() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.json") if not p.name.endswith(".api.json"))


def api_workflows() -> list[Path]:
    """API twins live in example_workflows/api/<name>.json, where the template browser does not list them;
    `<name>.api.json` beside the UI file is accepted too (the template test then flags it)."""
    return sorted(EXAMPLES.glob("api/*.json")) + sorted(EXAMPLES.glob("*.api.json"))


def combo_options(spec):
    """Options of a combo input spec from /object_info (old list style or ("COMBO", {"options": [...]})."""
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return spec[1].get("options", [])
    return None


def build_node(object_info: dict, class_type: str, links: dict, overrides: dict | None = None) -> dict:
    """API-format node: required inputs whose type is in `links` are linked, widgets take their default
    (first option for combos), `overrides` win."""
    inputs = {}
    for name, spec in object_info[class_type]["input"]["required"].items():
        options = combo_options(spec)
        if options is not None:
            inputs[name] = options[0] if options else ""
        elif spec[0] in links:
            inputs[name] = links[spec[0]]
        elif len(spec) > 1 and "default" in spec[1]:
            inputs[name] = spec[1]["default"]
    inputs.update(overrides or {})
    return {"class_type": class_type, "inputs": inputs}
