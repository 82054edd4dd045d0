import assert from "node:assert/strict";
import { test } from "node:test";

import {
    PAYLOAD_KEYS,
    colorForToken,
    formatCount,
    formatDuration,
    formatPercent,
    formatRate,
    estimateTextWidth,
    layoutPanel,
    panelFromOutput,
} from "../../web/vqcore_panels.js";

const tokens = { grid: [16, 16], used: 87, codebook: 1024, histogram: [5, 0, 12, 3] };
const tiles = { grid: [2, 3], tile_px: 512, image_px: [1024, 1536], ms_per_tile: 41.25 };
const sampler = { steps: 25, steps_per_s: 3.4123, mode: "fast" };

test("formatting helpers", () => {
    assert.equal(formatCount(1234567), "1,234,567");
    assert.equal(formatCount(999), "999");
    assert.equal(formatPercent(87 / 1024), "8.5%");
    assert.equal(formatPercent(0.5), "50%");
    assert.equal(formatPercent(0), "0%");
    assert.equal(formatDuration(0.25), "250 µs");
    assert.equal(formatDuration(41.25), "41 ms");
    assert.equal(formatDuration(4.25), "4.3 ms");
    assert.equal(formatDuration(2500), "2.50 s");
    assert.equal(formatRate(3.4123), "3.41");
    assert.equal(formatRate(250.4), "250");
    assert.equal(formatRate(0.0123), "0.012");
});

test("token colours are stable, distinct for neighbours, valid CSS", () => {
    assert.equal(colorForToken(7, 1024), colorForToken(7, 1024));
    assert.notEqual(colorForToken(7, 1024), colorForToken(8, 1024));
    assert.match(colorForToken(0, 1), /^hsl\(\d+, 70%, \d+%\)$/);
});

test("output without our keys gives no panel", () => {
    for (const output of [undefined, null, 3, "x", {}, { images: [{ filename: "a.png" }] }]) {
        assert.equal(panelFromOutput(output), null);
    }
    assert.deepEqual(PAYLOAD_KEYS, ["vqcore_tokens", "vqcore_tiles", "vqcore_sampler"]);
});

test("token usage section", () => {
    const [section] = panelFromOutput({ vqcore_tokens: [tokens] });
    assert.deepEqual(section.lines, ["Tokens 16×16", "87 / 1,024 codes used (8.5%)"]);
    assert.deepEqual(section.histogram, [5, 0, 12, 3]);
    assert.equal(section.map, null);
});

test("batch of several entries shows the first and says how many more", () => {
    const [section] = panelFromOutput({ vqcore_tokens: [tokens, tokens, tokens] });
    assert.equal(section.lines[0], "Tokens 16×16 (+2 more)");
});

test("tile section uses the image aspect for the grid drawing", () => {
    const [section] = panelFromOutput({ vqcore_tiles: [tiles] });
    assert.deepEqual(section.lines, ["Tiles 2×3 = 6", "512 px tiles · 41 ms/tile"]);
    assert.deepEqual(section.tiles, { rows: 2, cols: 3, aspect: 1.5 });
    const [square] = panelFromOutput({ vqcore_tiles: [{ ...tiles, image_px: undefined }] });
    assert.equal(square.tiles.aspect, 1.5, "without image_px the grid's own shape");
});

test("sampler section", () => {
    const [section] = panelFromOutput({ vqcore_sampler: [sampler] });
    assert.deepEqual(section.lines, ["25 steps (fast) · 3.41 steps/s"]);
    const [plain] = panelFromOutput({ vqcore_sampler: [{ steps: 1, steps_per_s: 120 }] });
    assert.deepEqual(plain.lines, ["1 steps · 120 steps/s"]);
});

test("malformed entries are ignored rather than thrown on", () => {
    const bad = [
        { vqcore_tokens: {} },
        { vqcore_tokens: [] },
        { vqcore_tokens: [null] },
        { vqcore_tokens: [{ ...tokens, used: 2000 }] },
        { vqcore_tokens: [{ ...tokens, grid: [16] }] },
        { vqcore_tokens: [{ ...tokens, histogram: [1, -1] }] },
        { vqcore_tokens: [{ ...tokens, map: [1, 2, 3], map_grid: [2, 2] }] },
        { vqcore_tiles: [{ ...tiles, ms_per_tile: "fast" }] },
        { vqcore_tiles: [{ ...tiles, grid: [0, 3] }] },
        { vqcore_sampler: [{ steps: 2.5, steps_per_s: 1 }] },
        { vqcore_sampler: [{ steps: 2, steps_per_s: Infinity }] },
    ];
    for (const output of bad) assert.equal(panelFromOutput(output), null, JSON.stringify(output));
    // A bad section does not hide a good one beside it.
    assert.equal(panelFromOutput({ vqcore_tokens: [null], vqcore_sampler: [sampler] }).length, 1);
});

// Every op lies inside the panel box.
function assertInside(layout) {
    for (const op of layout.ops) {
        assert.ok(op.x >= 0 && op.y >= 0 && op.y <= layout.height, JSON.stringify(op));
        if (op.w !== undefined) {
            assert.ok(op.x + op.w <= layout.width + 1e-9 && op.y + op.h <= layout.height + 1e-9, JSON.stringify(op));
        }
    }
}

test("layout: histogram bars scale to the largest count and span the panel", () => {
    const sections = panelFromOutput({ vqcore_tokens: [tokens] });
    const layout = layoutPanel(sections);
    const bars = layout.ops.filter((o) => o.op === "rect");
    assert.equal(bars.length, 4);
    const tallest = Math.max(...bars.map((b) => b.h));
    assert.equal(bars[2].h, tallest);                 // count 12 is the maximum
    assert.equal(bars[1].h, 1);                       // empty bin keeps a 1 px mark
    assert.notEqual(bars[1].fill, bars[0].fill);      // and is drawn in the "empty" colour
    assert.equal(bars[0].x, 6);
    assert.ok(Math.abs(bars[3].x + bars[3].w + 1 - (layout.width - 6)) < 1e-9, "last bar ends at the padding");
    assertInside(layout);
    assert.deepEqual(layout.ops.filter((o) => o.op === "text").map((o) => o.text), sections[0].lines);
});

test("layout: token map cells cover the map box row-major", () => {
    const map = [0, 1, 2, 3, 4, 5];
    const sections = panelFromOutput({ vqcore_tokens: [{ ...tokens, histogram: undefined, map, map_grid: [2, 3] }] });
    const layout = layoutPanel(sections);
    const cells = layout.ops.filter((o) => o.op === "rect");
    assert.equal(cells.length, 6);
    assert.equal(cells[1].x - cells[0].x, cells[0].w);   // same row, next column
    assert.equal(cells[3].x, cells[0].x);                // second row starts at the left
    assert.equal(cells[3].y - cells[0].y, cells[0].h);
    assert.equal(cells[0].h * 2, 96, "drawn at full height");
    assert.equal(cells[4].fill, colorForToken(4, 1024));
    assertInside(layout);
});

test("layout: tile grid keeps the image aspect and has one cell per tile", () => {
    const layout = layoutPanel(panelFromOutput({ vqcore_tiles: [tiles] }));
    const frames = layout.ops.filter((o) => o.op === "strokeRect");
    assert.equal(frames.length, 6);
    const width = frames[2].x + frames[2].w - frames[0].x;
    const height = frames[5].y + frames[5].h - frames[0].y;
    assert.ok(Math.abs(width / height - 1.5) < 1e-9);
    assert.equal(height, 80);
    assertInside(layout);
});

test("layout: extreme aspect ratios are capped in width and drawn lower", () => {
    const wide = layoutPanel(panelFromOutput({ vqcore_tiles: [{ ...tiles, image_px: [512, 8192] }] }));
    assert.equal(wide.width, 480 + 12);
    const frames = wide.ops.filter((o) => o.op === "strokeRect");
    assert.ok(Math.abs(frames[0].h * 2 - 480 / 16) < 1e-9);
    assertInside(wide);
});

test("layout: panel height grows with each section", () => {
    const one = layoutPanel(panelFromOutput({ vqcore_sampler: [sampler] })).height;
    const two = layoutPanel(panelFromOutput({ vqcore_sampler: [sampler], vqcore_tiles: [tiles] })).height;
    assert.ok(one > 0 && two > one);
});

test("layout: the panel is as wide as its widest content, measured in the panel font", () => {
    const sections = panelFromOutput({ vqcore_sampler: [sampler] });
    const line = sections[0].lines[0];
    assert.equal(layoutPanel(sections).width, Math.ceil(estimateTextWidth(line)) + 12);
    const measured = layoutPanel(sections, (text) => text.length * 10);
    assert.equal(measured.width, line.length * 10 + 12);
    assertInside(measured);
    // a histogram keeps 2 px per bin even under a short line
    const narrow = layoutPanel(panelFromOutput({ vqcore_tokens: [tokens] }), () => 10);
    assert.equal(narrow.width, 128 + 12);
});
