import assert from "node:assert/strict";
import { register } from "node:module";
import { test } from "node:test";

register("./app_stub_hooks.mjs", import.meta.url);
const { app } = await import("./app_stub.mjs");
await import("../../web/vqcore_extension.js");

// Minimal LiteGraph node: what the extension reads and calls on a node instance.
function fakeNode(comfyClass) {
    return {
        comfyClass,
        size: [240, 100],
        flags: {},
        computeSize() {
            return [200, 80];
        },
        setSize(size) {
            this.size = [...size];
        },
        setDirtyCanvas() {
            this.dirty = true;
        },
    };
}

// Canvas context that records the drawing calls.
function recordingContext() {
    const calls = [];
    const record = (name) => (...args) => calls.push([name, ...args]);
    return {
        calls,
        save: record("save"),
        restore: record("restore"),
        fillText: record("fillText"),
        fillRect: record("fillRect"),
        strokeRect: record("strokeRect"),
    };
}

const extension = app.extensions.find((e) => e.name === "vqcore.panels");
const payload = { vqcore_sampler: [{ steps: 10, steps_per_s: 2.5 }] };

test("registers exactly one named extension with the app", () => {
    assert.equal(app.extensions.length, 1);
    assert.equal(typeof extension.nodeCreated, "function");
});

test("nodes of other packs are left untouched", () => {
    const node = fakeNode("KSampler");
    const before = { ...node };
    extension.nodeCreated(node);
    assert.deepEqual(Object.keys(node), Object.keys(before));
    assert.equal(node.onExecuted, undefined);
    const missingClass = fakeNode(undefined);
    extension.nodeCreated(missingClass);
    assert.equal(missingClass.onExecuted, undefined);
});

test("our node shows the panel after execution and grows to fit it", () => {
    const node = fakeNode("VQCoreVQDiffusionSampler");
    let previous = null;
    node.onExecuted = (output) => (previous = output);
    extension.nodeCreated(node);
    node.onExecuted(payload);
    assert.equal(previous, payload, "an existing onExecuted still runs");
    assert.ok(node.dirty);
    assert.ok(node.size[1] > 80, "node height includes the panel");
    assert.ok(node.size[0] >= 240, "node is never narrowed");

    const ctx = recordingContext();
    node.onDrawForeground(ctx);
    const texts = ctx.calls.filter((c) => c[0] === "fillText");
    assert.equal(texts.length, 1);
    assert.equal(texts[0][1], "10 steps · 2.50 steps/s");
    const panelTop = node.size[1] - (node.computeSize()[1] - 80);
    assert.ok(texts[0][3] > panelTop, "drawn in the panel area at the bottom of the node");
    assert.deepEqual([ctx.calls[0][0], ctx.calls.at(-1)[0]], ["save", "restore"]);
});

test("no drawing before execution, when collapsed, or after an output without our data", () => {
    const node = fakeNode("VQCoreEncode");
    extension.nodeCreated(node);
    let ctx = recordingContext();
    node.onDrawForeground(ctx);
    assert.equal(ctx.calls.length, 0);
    assert.deepEqual(node.computeSize(), [200, 80]);

    node.onExecuted(payload);
    node.flags.collapsed = true;
    ctx = recordingContext();
    node.onDrawForeground(ctx);
    assert.equal(ctx.calls.length, 0);

    node.flags.collapsed = false;
    node.onExecuted({ images: [] });
    ctx = recordingContext();
    node.onDrawForeground(ctx);
    assert.equal(ctx.calls.length, 0);
    assert.deepEqual(node.computeSize(), [200, 80]);
});

test("tile payload draws one framed cell per tile", () => {
    const node = fakeNode("VQCoreTiledVAEDecode");
    extension.nodeCreated(node);
    node.onExecuted({ vqcore_tiles: [{ grid: [3, 2], tile_px: 256, ms_per_tile: 12 }] });
    const ctx = recordingContext();
    node.onDrawForeground(ctx);
    assert.equal(ctx.calls.filter((c) => c[0] === "strokeRect").length, 6);
});

test("a narrow node is widened to show the panel's longest line", () => {
    const node = fakeNode("VQCoreEncode");
    node.size = [100, 100];
    extension.nodeCreated(node);
    node.onExecuted({ vqcore_tokens: [{ grid: [64, 64], used: 1000, codebook: 8192 }] });
    assert.ok(node.size[0] > "1,000 / 8,192 codes used (12%)".length * 5);
    assert.deepEqual(node.computeSize().map(Math.round), node.size.map(Math.round));
});
