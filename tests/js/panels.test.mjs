import assert from "node:assert/strict";
import { test } from "node:test";

import {
    PAYLOAD_KEYS,
    colorForToken,
    formatCount,
    formatDuration,
    formatPercent,
    formatRate,
    layoutPanel,
    panelFromOutput,
    panelMinWidth,
} from "../../web/vqcore_panels.js";

const tokens = { grid: [16, 16], used: 87, codebook: 1024, histogram: [5, 0, 12, 3] };
const tiles = { grid: [2, 3], tile_px: 512, overlap_px: 64, image_px: [1024, 1536], ms_per_tile: 41.25 };
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
    assert.deepEqual(section.lines, ["Tiles 2×3 = 6", "512 px tiles, overlap 64 px · 41 ms/tile"]);
    assert.deepEqual(section.tiles, { rows: 2, cols: 3, aspect: 1.5 });
    const [seamless] = panelFromOutput({ vqcore_tiles: [{ ...tiles, overlap_px: 0 }] });
    assert.equal(seamless.lines[1], "512 px tiles · 41 ms/tile");
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

test("layout: histogram bars scale to the largest count and stay inside the panel", () => {
    const sections = panelFromOutput({ vqcore_tokens: [tokens] });
    const { height, ops } = layoutPanel(sections, 200);
    const bars = ops.filter((o) => o.op === "rect");
    assert.equal(bars.length, 4);
    const tallest = Math.max(...bars.map((b) => b.h));
    assert.equal(bars[2].h, tallest);                 // count 12 is the maximum
    assert.equal(bars[1].h, 1);                       // empty bin keeps a 1 px mark
    assert.notEqual(bars[1].fill, bars[0].fill);      // and is drawn in the "empty" colour
    for (const op of ops) {
        assert.ok(op.x >= 0 && op.y >= 0 && op.y <= height, JSON.stringify(op));
        if (op.op === "rect") assert.ok(op.x + op.w <= 200 + 1e-9);
    }
    assert.deepEqual(ops.filter((o) => o.op === "text").map((o) => o.text), sections[0].lines);
});

test("layout: token map cells cover the map box row-major", () => {
    const map = [0, 1, 2, 3, 4, 5];
    const sections = panelFromOutput({ vqcore_tokens: [{ ...tokens, histogram: undefined, map, map_grid: [2, 3] }] });
    const cells = layoutPanel(sections, 300).ops.filter((o) => o.op === "rect");
    assert.equal(cells.length, 6);
    assert.equal(cells[1].x - cells[0].x, cells[0].w);   // same row, next column
    assert.equal(cells[3].x, cells[0].x);                // second row starts at the left
    assert.equal(cells[3].y - cells[0].y, cells[0].h);
    assert.equal(cells[4].fill, colorForToken(4, 1024));
});

test("layout: tile grid keeps the image aspect and has one cell per tile", () => {
    const sections = panelFromOutput({ vqcore_tiles: [tiles] });
    const ops = layoutPanel(sections, 400).ops;
    const frames = ops.filter((o) => o.op === "strokeRect");
    assert.equal(frames.length, 6);
    const width = frames[2].x + frames[2].w - frames[0].x;
    const height = frames[5].y + frames[5].h - frames[0].y;
    assert.ok(Math.abs(width / height - 1.5) < 1e-9);
    assert.ok(height <= 80);
});

test("layout: panel height grows with each section", () => {
    const one = layoutPanel(panelFromOutput({ vqcore_sampler: [sampler] }), 200).height;
    const two = layoutPanel(panelFromOutput({ vqcore_sampler: [sampler], vqcore_tiles: [tiles] }), 200).height;
    assert.ok(one > 0 && two > one);
});

test("minimum width fits the longest line and keeps drawings at full height", () => {
    const sampled = panelFromOutput({ vqcore_sampler: [sampler] });
    const textOnly = panelMinWidth(sampled);
    assert.ok(textOnly > sampled[0].lines[0].length * 5 && textOnly < sampled[0].lines[0].length * 9);

    const wide = panelFromOutput({ vqcore_tiles: [{ ...tiles, image_px: [512, 2048] }] });
    const min = panelMinWidth(wide);
    assert.ok(min >= 80 * 4, "the tile grid is drawn at its full height");
    assert.equal(layoutPanel(wide, min).height, layoutPanel(wide, min + 300).height);
    assert.equal(layoutPanel(wide, min).minWidth, min);
    const extreme = panelFromOutput({ vqcore_tiles: [{ ...tiles, image_px: [512, 8192] }] });
    assert.ok(panelMinWidth(extreme) <= 480 + 12, "extreme aspect ratios are capped");

    const map = panelFromOutput({ vqcore_tokens: [{ ...tokens, map: new Array(8).fill(1), map_grid: [2, 4] }] });
    const mapMin = panelMinWidth(map);
    assert.equal(layoutPanel(map, mapMin).height, layoutPanel(map, mapMin + 200).height);
    assert.ok(layoutPanel(map, mapMin - 100).height < layoutPanel(map, mapMin).height);
});
