import assert from "node:assert/strict";
import { register } from "node:module";
import { test } from "node:test";

import { MEASURE_CHAR_WIDTH, installDocument } from "./dom_stub.mjs";

register("./app_stub_hooks.mjs", import.meta.url);
installDocument();
const { app } = await import("./app_stub.mjs");
const { PANEL_WIDGET } = await import("../../web/vqcore_extension.js");
const { COLORS } = await import("../../web/vqcore_panels.js");

const BASE_SIZE = [200, 80];

// Minimal LiteGraph node: what the extension reads and calls on a node instance. Like LiteGraph, its minimum
// height adds up its widgets' minimum heights.
function fakeNode(comfyClass) {
    return {
        comfyClass,
        size: [240, 100],
        widgets: [],
        addDOMWidget(name, type, element, options) {
            const widget = { name, type, element, options };
            this.widgets.push(widget);
            return widget;
        },
        computeSize() {
            const widgets = this.widgets.reduce((sum, w) => sum + w.options.getMinHeight(), 0);
            return [BASE_SIZE[0], BASE_SIZE[1] + widgets];
        },
        setSize(size) {
            this.size = [...size];
        },
        setDirtyCanvas() {
            this.dirty = true;
        },
    };
}

function panelOf(node) {
    const widget = node.widgets.find((w) => w.name === PANEL_WIDGET);
    const svg = widget.element.children[0] ?? null;
    return { widget, svg, texts: svg ? svg.findAll("text").map((t) => t.textContent) : [] };
}

const extension = app.extensions.find((e) => e.name === "vqcore.panels");
const sampler = { vqcore_sampler: [{ steps: 10, steps_per_s: 2.5 }] };

function createdNode(comfyClass) {
    const node = fakeNode(comfyClass);
    extension.nodeCreated(node);
    return node;
}

test("registers exactly one named extension with the app", () => {
    assert.equal(app.extensions.length, 1);
    assert.equal(typeof extension.nodeCreated, "function");
});

test("nodes of other packs are left untouched", () => {
    const node = fakeNode("KSampler");
    const before = { ...node };
    extension.nodeCreated(node);
    assert.deepEqual(Object.keys(node), Object.keys(before));
    assert.equal(node.widgets.length, 0);
    assert.equal(node.onExecuted, undefined);
    const missingClass = fakeNode(undefined);
    extension.nodeCreated(missingClass);
    assert.equal(missingClass.widgets.length, 0);
});

test("our node gets one empty panel widget that is never saved and takes no room before a run", () => {
    const node = createdNode("VQCoreEncode");
    assert.equal(node.widgets.length, 1);
    const { widget, svg } = panelOf(node);
    assert.equal(widget.serialize, false, "kept out of widgets_values");
    assert.equal(widget.options.serialize, false, "kept out of the prompt");
    assert.equal(widget.options.margin, 0);
    assert.equal(svg, null);
    assert.equal(widget.options.getMinHeight(), 0);
    assert.deepEqual(node.computeSize(), BASE_SIZE);
});

test("after a run the panel shows the node's numbers and the node grows to fit it", () => {
    const node = createdNode("VQCoreVQDiffusionSampler");
    node.onExecuted(sampler);
    const { widget, svg, texts } = panelOf(node);
    assert.deepEqual(texts, ["10 steps · 2.50 steps/s"]);
    const height = Number(svg.attributes.height);
    assert.ok(height > 16, "at least one text line");
    assert.equal(widget.options.getMinHeight(), height);
    assert.equal(widget.options.getMaxHeight(), height, "fixed height: a preview below gets the rest");
    assert.equal(svg.attributes.viewBox, `0 0 ${svg.attributes.width} ${height}`);
    assert.equal(node.size[1], BASE_SIZE[1] + height);
    assert.ok(node.size[0] >= 240, "a node is never narrowed");
    assert.ok(node.dirty);
});

test("an existing onExecuted still runs", () => {
    const node = fakeNode("VQCoreDecode");
    let previous = null;
    node.onExecuted = (output) => (previous = output);
    extension.nodeCreated(node);
    node.onExecuted(sampler);
    assert.equal(previous, sampler);
});

test("an output without our data clears the panel", () => {
    const node = createdNode("VQCoreDecode");
    node.onExecuted(sampler);
    node.onExecuted({ images: [] });
    const { widget, svg } = panelOf(node);
    assert.equal(svg, null);
    assert.equal(widget.options.getMinHeight(), 0);
    assert.deepEqual(node.computeSize(), BASE_SIZE);
});

test("tile payload draws one framed cell per tile", () => {
    const node = createdNode("VQCoreTiledVAEDecode");
    node.onExecuted({ vqcore_tiles: [{ grid: [3, 2], tile_px: 256, ms_per_tile: 12 }] });
    const rects = panelOf(node).svg.findAll("rect");
    const frames = rects.filter((r) => r.style.fill === "none");
    assert.equal(frames.length, 6);
    assert.ok(frames.every((r) => r.style.stroke === COLORS.frame));
    assert.equal(rects.filter((r) => r.style.fill === COLORS.tile).length, 6);
});

test("token histogram bars are drawn in the bar colour", () => {
    const node = createdNode("VQCoreEncode");
    node.onExecuted({ vqcore_tokens: [{ grid: [8, 8], used: 3, codebook: 16, histogram: [4, 0, 60, 0] }] });
    const fills = panelOf(node).svg.findAll("rect").map((r) => r.style.fill);
    assert.deepEqual(fills, [COLORS.bar, COLORS.barEmpty, COLORS.bar, COLORS.barEmpty]);
});

test("a narrow node is widened to the panel, whose width comes from the measured text", () => {
    const node = fakeNode("VQCoreEncode");
    node.size = [100, 100];
    extension.nodeCreated(node);
    node.onExecuted({ vqcore_tokens: [{ grid: [64, 64], used: 1000, codebook: 8192 }] });
    const longest = "1,000 / 8,192 codes used (12%)";
    const { svg, texts } = panelOf(node);
    assert.ok(texts.includes(longest));
    const width = Number(svg.attributes.width);
    assert.ok(width >= longest.length * MEASURE_CHAR_WIDTH && width < longest.length * MEASURE_CHAR_WIDTH + 20);
    assert.equal(node.size[0], width);
    assert.deepEqual(node.computeSize(), node.size);
});
