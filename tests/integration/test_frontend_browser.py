"""The pack in ComfyUI's real front end, in headless Chromium, with each node renderer the host's front end has: the
classic canvas, and Nodes 2.0 (Vue nodes, setting Comfy.VueNodes.Enabled) from ComfyUI 0.33 on. In each: the
extension loads without console errors from the pack, every example workflow opens from the template endpoint
with all its node types known, a run from the front end shows every kind of panel inside its node and clear of the
sampler's preview image, and the Chinese locale shows the Chinese node names of locales/zh.
Needs Debian's chromium and the playwright package (its own browser downloads are not used)."""

import json
import os
import re
import shutil
import urllib.parse

import pytest
from comfy_server import PACK_FOLDER, REPO_ROOT, comfyui_path, comfyui_version
from workflows import load_json, ui_workflows

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH")

# Headless flags for a machine without a display or outside network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 60_000
RUN_TIMEOUT_MS = 600_000
APP = "window.comfyAPI.app.app"
PANEL_WIDGET = "vqcore_panel"
# What each payload key puts in its panel's text (web/vqcore_panels.js).
PANEL_TEXT = {"vqcore_tokens": "codes used", "vqcore_tiles": "px tiles", "vqcore_sampler": "steps/s"}
# Between them these runs send every payload key; the test checks that they do.
RUN_WORKFLOWS = ("vq_encode_decode_roundtrip", "autoencoder_kl_vae_decode", "vq_diffusion_token_inpainting")


def host_version() -> tuple:
    path = comfyui_path()
    numbers = re.findall(r"\d+", comfyui_version(path)) if path else []
    return tuple(int(n) for n in numbers[:3])


# Nodes 2.0 is a released renderer from front end 1.49 (ComfyUI 0.33) on; 0.3.64's 1.27 only has an early draft.
RENDERERS = ["classic", "nodes2"] if host_version() >= (0, 33) else ["classic"]


@pytest.fixture(scope="module")
def browser(comfy):
    comfy.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog over the canvas
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_app(browser, comfy):
    """A new page with the app started; .messages collects console errors and uncaught exceptions."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    page.messages = []
    page.on("console", lambda m: m.type == "error" and page.messages.append(
        f"console error: {m.text} @ {m.location.get('url', '')}"))
    page.on("pageerror", lambda e: page.messages.append(f"pageerror: {e}\n{e.stack or ''}"))
    page.goto(comfy.url, timeout=TIMEOUT_MS)
    # The app loads its startup workflow a moment after it reports ready; a graph loaded before that would be
    # replaced, so wait until it is the active workflow.
    page.wait_for_function(f"""() => window.comfyAPI?.app?.app?.graph && {APP}.extensions.length > 0
        && {APP}.extensionManager?.workflow?.activeWorkflow != null""")
    return page


@pytest.fixture(scope="module", params=RENDERERS)
def page(request, browser, comfy, tmp_path_factory):
    renderer = request.param
    comfy.post("/settings/Comfy.VueNodes.Enabled", renderer == "nodes2")
    page = open_app(browser, comfy)
    page.renderer = renderer
    page.screenshots = tmp_path_factory.mktemp(f"screenshots_{renderer}")
    try:
        yield page
    finally:
        if os.environ.get("VQCORE_SCREENSHOTS"):
            shutil.copytree(page.screenshots, os.path.join(os.environ["VQCORE_SCREENSHOTS"], renderer),
                            dirs_exist_ok=True)
        page.close()
        comfy.post("/settings/Comfy.VueNodes.Enabled", False)


def our_errors(messages):
    """Console errors and uncaught exceptions from this pack's files (/extensions/<pack>/...), its endpoints
    (templates, thumbnails) or naming it; the host's own noise (offline requests to api.comfy.org, missing
    user files) is not ours."""
    return [m for m in messages if PACK_FOLDER in m or "vqcore" in m.lower()]


def template_url(name):
    return f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}.json"


def load_template(page, name):
    """Opens the template as the template browser does; returns the node types of the loaded graph."""
    return page.evaluate("""async ([url, name]) => {
        const app = window.comfyAPI.app.app;
        const json = await (await fetch(url)).json();
        await app.loadGraphData(json, true, true, name);
        return app.graph.nodes.map(n => n.type);
    }""", [template_url(name), name])


# Screen rectangles {x, y, w, h} of a node, its panel's drawing and its preview images, in either renderer: Nodes 2.0 nodes
# are DOM elements ([data-node-id]) with their previews as <img>; classic nodes are drawn on the canvas, where the
# preview is the node's image-preview widget (from its y to the widget's height, or to the node's bottom where
# the front end does not compute widget heights) and the panel is a DOM element placed over the canvas.
REGIONS_JS = """([id, panelWidget]) => {
    const app = window.comfyAPI.app.app, node = app.graph.getNodeById(id), canvas = app.canvas;
    const rect = r => ({x: r.left, y: r.top, w: r.width, h: r.height});
    const onScreen = (x, y, w, h) => {
        const c = canvas.canvas.getBoundingClientRect(), s = canvas.ds.scale, [ox, oy] = canvas.ds.offset;
        return {x: c.left + (x + ox) * s, y: c.top + (y + oy) * s, w: w * s, h: h * s};
    };
    const panel = node.widgets?.find(w => w.name === panelWidget)?.element;
    const element = document.querySelector(`[data-node-id="${id}"]`);
    let nodeBox, previews;
    if (element) {
        nodeBox = rect(element.getBoundingClientRect());
        previews = [...element.querySelectorAll("img")].filter(i => !panel?.contains(i))
            .map(i => rect(i.getBoundingClientRect()));
    } else {
        const title = window.LiteGraph.NODE_TITLE_HEIGHT;
        nodeBox = onScreen(node.pos[0], node.pos[1] - title, node.size[0], node.size[1] + title);
        previews = node.imgs?.length ? (node.widgets ?? []).filter(w => w.name === "$$canvas-image-preview")
            .map(w => onScreen(node.pos[0], node.pos[1] + w.y, node.size[0], w.computedHeight ?? node.size[1] - w.y))
            : [];
    }
    // what the user sees of the panel is its drawing, which could overflow the widget's box
    const drawing = panel?.querySelector("svg")?.getBoundingClientRect();
    const topmost = drawing ? panel.contains(document.elementFromPoint(drawing.left + drawing.width / 2,
                                                                       drawing.top + drawing.height / 2)) : null;
    return {node: nodeBox, panel: drawing ? rect(drawing) : null, previews, topmost,
            text: panel ? [...panel.querySelectorAll("text")].map(t => t.textContent) : []};
}"""


def inside(inner, outer):
    return (inner["x"] >= outer["x"] - 0.5 and inner["y"] >= outer["y"] - 0.5
            and inner["x"] + inner["w"] <= outer["x"] + outer["w"] + 0.5
            and inner["y"] + inner["h"] <= outer["y"] + outer["h"] + 0.5)


def overlap(a, b):
    return (min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"]) > 0.5
            and min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"]) > 0.5)


def test_extension_loads_without_console_errors(page):
    names = page.evaluate(f"() => {APP}.extensions.map(e => e.name)")
    assert "vqcore.panels" in names
    if page.renderer == "nodes2":
        assert page.evaluate(f"() => {APP}.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
    # the default graph has none of our nodes: nothing of ours may complain
    assert our_errors(page.messages) == []


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.stem)
def test_template_opens_with_every_node_type_known(page, path):
    types = load_template(page, path.stem)
    unknown = page.evaluate(f"""() => {APP}.graph.nodes.filter(
        n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type)""")
    assert sorted(types) == sorted(node["type"] for node in load_json(path)["nodes"])
    assert unknown == []
    if page.renderer == "nodes2":  # every node is mounted as a Vue component
        page.wait_for_function(f"""() => {APP}.graph.nodes.every(
            n => document.querySelector(`[data-node-id="${{n.id}}"]`))""")
    page.screenshot(path=str(page.screenshots / f"{path.stem}.png"))
    assert our_errors(page.messages) == []


def run_template(page, comfy, name):
    """Queues the template from the front end and waits until every output node reported; returns the
    `executed` events' payload keys per node id."""
    comfy.clear_cache()  # a cached node sends no output, so it would draw nothing
    nodes = load_json(REPO_ROOT / "example_workflows" / f"{name}.json")["nodes"]
    outputs = [str(n["id"]) for n in nodes if comfy.get(f"/object_info/{n['type']}")[n["type"]]["output_node"]]
    load_template(page, name)
    page.evaluate(f"""async () => {{
        const api = window.comfyAPI.api.api;
        window.vqcoreExecuted = {{}};
        window.vqcoreError = null;
        api.addEventListener("executed", e => {{
            window.vqcoreExecuted[String(e.detail.node)] = Object.keys(e.detail.output ?? {{}});
        }});
        api.addEventListener("execution_error", e => {{ window.vqcoreError = e.detail; }});
        await {APP}.queuePrompt(0, 1);
    }}""")
    page.wait_for_function("(ids) => window.vqcoreError || ids.every(id => id in window.vqcoreExecuted)",
                           arg=outputs, timeout=RUN_TIMEOUT_MS)
    error = page.evaluate("() => window.vqcoreError")
    assert error is None, f"{name} failed in node {error['node_id']} ({error['node_type']}): {error['exception_message']}"
    return page.evaluate("() => window.vqcoreExecuted")


def test_a_run_from_the_front_end_shows_every_panel_clear_of_the_preview(page, comfy):
    shown = set()
    for name in RUN_WORKFLOWS:
        executed = run_template(page, comfy, name)
        ours = {node_id: [k for k in keys if k in PANEL_TEXT] for node_id, keys in executed.items()}
        ours = {node_id: keys for node_id, keys in ours.items() if keys}
        assert ours, f"{name}: no node sent a panel payload ({executed})"
        # each panel is drawn once its node's output arrived: wait for its text, then for the layout to settle
        page.wait_for_function(f"""(ids) => ids.every(id => {APP}.graph.getNodeById(id).widgets
            .find(w => w.name === "{PANEL_WIDGET}").element.querySelector("text"))""", arg=list(ours))
        page.evaluate(f"() => {APP}.canvas.setDirty(true, true)")
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        page.screenshot(path=str(page.screenshots / f"run_{name}.png"))
        for node_id, keys in ours.items():
            regions = page.evaluate(REGIONS_JS, [node_id, PANEL_WIDGET])
            panel, node = regions["panel"], regions["node"]
            where = f"{page.renderer}, {name}, node {node_id}: {regions}"
            assert panel and panel["w"] > 0 and panel["h"] > 0, where
            assert inside(panel, node), where
            assert regions["topmost"], f"something covers the panel ({where})"
            text = " ".join(regions["text"])
            assert all(PANEL_TEXT[k] in text for k in keys), where
            assert not any(overlap(panel, preview) for preview in regions["previews"]), where
            if "vqcore_sampler" in keys:  # the sampler's preview is there, so the check above is not vacuous
                assert regions["previews"], f"the sampler shows no preview ({where})"
            shown.update(keys)
    assert shown == set(PANEL_TEXT)
    assert our_errors(page.messages) == []


def test_chinese_locale_shows_chinese_node_names(browser, comfy, page):
    chinese = {node_id: entry["display_name"]
               for node_id, entry in json.loads((REPO_ROOT / "locales/zh/nodeDefs.json").read_text()).items()}
    comfy.post("/settings/Comfy.Locale", "zh")
    try:
        zh_page = open_app(browser, comfy)
        try:
            for path in ui_workflows():
                load_template(zh_page, path.stem)
                if page.renderer == "nodes2":
                    zh_page.wait_for_function(f"""() => {APP}.graph.nodes.every(n => document.querySelector(
                        `[data-node-id="${{n.id}}"] [data-testid="node-title"]`))""")
                titles = zh_page.evaluate(f"""() => {APP}.graph.nodes.filter(n => n.type.startsWith("VQCore"))
                    .map(n => {{
                        const element = document.querySelector(`[data-node-id="${{n.id}}"] [data-testid="node-title"]`);
                        return [n.type, element ? element.textContent.trim() : n.getTitle()];
                    }})""")
                assert titles, path.name
                assert all(title == chinese[node_type] for node_type, title in titles), titles
            zh_page.screenshot(path=str(page.screenshots / "chinese_locale.png"))
            assert our_errors(zh_page.messages) == []
        finally:
            zh_page.close()
    finally:
        comfy.post("/settings/Comfy.Locale", "en")
