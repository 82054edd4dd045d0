"""The pack in ComfyUI's real front end, in headless Chromium: the extension loads without console errors, every
example workflow opens from the template endpoint with all its node types known, and a run shows our panels.
Needs Debian's chromium and the playwright package (its own browser downloads are not used)."""

import os
import shutil
import time
import urllib.parse

import pytest
from comfy_server import PACK_FOLDER
from workflows import load_json, ui_workflows

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH")

# Headless flags for a machine without a display or outside network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
APP = "window.comfyAPI.app.app"


@pytest.fixture(scope="module")
def page(comfy, tmp_path_factory):
    comfy.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog over the canvas
    messages = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text} @ {m.location.get('url', '')}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}\n{e.stack or ''}"))
            page.goto(comfy.url, timeout=TIMEOUT_MS)
            # The app loads its startup workflow a moment after it reports ready; a graph loaded before that
            # would be replaced, so wait until it is the active workflow.
            page.wait_for_function(f"""() => window.comfyAPI?.app?.app?.graph && {APP}.extensions.length > 0
                && {APP}.extensionManager?.workflow?.activeWorkflow != null""")
            page.messages = messages
            page.screenshots = tmp_path_factory.mktemp("screenshots")
            yield page
        finally:
            browser.close()


def our_errors(messages):
    """Console errors and uncaught exceptions that come from this pack's files or name it."""
    return [m for m in messages if m.startswith(("error", "pageerror")) and "vqcore" in m.lower()]


def test_extension_loads_without_console_errors(page):
    names = page.evaluate(f"() => {APP}.extensions.map(e => e.name)")
    assert "vqcore.panels" in names
    # the default graph has none of our nodes: nothing of ours may complain
    assert our_errors(page.messages) == []


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.stem)
def test_template_opens_with_every_node_type_known(page, path):
    url = f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(path.name)}"
    result = page.evaluate("""async ([url, name]) => {
        const app = window.comfyAPI.app.app;
        const json = await (await fetch(url)).json();       // what the template browser does
        await app.loadGraphData(json, true, true, name);
        const nodes = app.graph.nodes;
        return {count: nodes.length, types: nodes.map(n => n.type),
                unknown: nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type)};
    }""", [url, path.stem])
    expected = [node["type"] for node in load_json(path)["nodes"]]
    assert sorted(result["types"]) == sorted(expected)
    assert result["unknown"] == []
    page.screenshot(path=str(page.screenshots / f"{path.stem}.png"))
    assert our_errors(page.messages) == []


def test_a_run_from_the_front_end_shows_our_panels(page, comfy):
    path = next(p for p in ui_workflows() if any(
        n["type"] == "VQCoreVQDiffusionSampler" for n in load_json(p)["nodes"]))
    url = f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(path.name)}"
    comfy.post("/free", {"free_memory": True})  # a cached prompt would send no node output to draw
    time.sleep(1)
    page.evaluate("""async ([url, name]) => {
        const app = window.comfyAPI.app.app;
        await app.loadGraphData(await (await fetch(url)).json(), true, true, name);
        await app.queuePrompt(0, 1);
    }""", [url, path.stem])
    panel = 'n.widgets?.find(w => w.name === "vqcore_panel")?.element.querySelector("svg")'
    page.wait_for_function(f"""() => {APP}.graph.nodes.some(
        n => n.comfyClass === "VQCoreVQDiffusionSampler" && {panel})""", timeout=300_000)
    lines = page.evaluate(f"""() => {APP}.graph.nodes.filter(n => {panel})
        .flatMap(n => [...{panel}.querySelectorAll("text")].map(t => t.textContent))""")
    assert any("steps/s" in line for line in lines), lines
    page.evaluate(f"() => {APP}.canvas.setDirty(true, true)")
    page.screenshot(path=str(page.screenshots / "after_run.png"))
    if os.environ.get("VQCORE_SCREENSHOTS"):
        shutil.copytree(page.screenshots, os.environ["VQCORE_SCREENSHOTS"], dirs_exist_ok=True)
    assert our_errors(page.messages) == []
