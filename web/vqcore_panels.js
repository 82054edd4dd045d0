// Pure logic behind the vqcore node panels: reads the `ui` payload our nodes return and turns it into
// drawing operations in panel coordinates. Nothing here touches the DOM, LiteGraph or the app, so it runs
// under `node --test`. The payload keys and fields are documented in web/docs/ui_payloads.md.

export const PAYLOAD_KEYS = ["vqcore_tokens", "vqcore_tiles", "vqcore_sampler"];

// The panel's text is drawn in this font; text widths are measured in it (see layoutPanel).
export const FONT = "12px sans-serif";
const LINE_HEIGHT = 16;
const PADDING = 6;
const HISTOGRAM_HEIGHT = 36;
// Narrowest histogram: 64 bins keep 2 px bars.
const MIN_HISTOGRAM_WIDTH = 128;
const MAX_MAP_HEIGHT = 96;
const MAX_TILE_GRID_HEIGHT = 80;
// Average advance of the panel font, for measuring text where no canvas can (tests, workers).
const CHAR_WIDTH = 7;
// Drawings of extreme aspect ratios are capped at this width (and drawn lower) instead of widening the node.
const MAX_DRAWING_WIDTH = 480;

// Text follows the colour palette's foreground; the drawings keep fixed colours on any node background.
export const COLORS = {
    text: "var(--fg-color, #ddd)",
    bar: "#6cf",
    barEmpty: "#333",
    frame: "#aaa",
    tile: "rgba(102, 204, 255, 0.18)",
};

const isCount = (v) => Number.isInteger(v) && v >= 0;
const isPositiveCount = (v) => Number.isInteger(v) && v > 0;
const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
const isPair = (v) => Array.isArray(v) && v.length === 2 && v.every(isPositiveCount);

export function formatCount(n) {
    return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

export function formatPercent(fraction) {
    const pct = fraction * 100;
    return `${pct >= 10 || pct === 0 ? pct.toFixed(0) : pct.toFixed(1)}%`;
}

export function formatDuration(ms) {
    if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`;
    if (ms < 1000) return `${ms < 10 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
    return `${(ms / 1000).toFixed(2)} s`;
}

export function formatRate(perSecond) {
    if (perSecond >= 100) return perSecond.toFixed(0);
    if (perSecond >= 1) return perSecond.toFixed(2);
    return perSecond.toPrecision(2);
}

// Stable, well-spread colour per codebook index so neighbouring codes look different.
export function colorForToken(index, codebookSize) {
    const hue = Math.round(((index * 0.6180339887) % 1) * 360);
    const light = 40 + Math.round((index / Math.max(1, codebookSize - 1)) * 30);
    return `hsl(${hue}, 70%, ${light}%)`;
}

function moreSuffix(entries) {
    return entries.length > 1 ? ` (+${entries.length - 1} more)` : "";
}

function firstValidEntry(entries, isValid) {
    if (!Array.isArray(entries) || entries.length === 0) return null;
    return isValid(entries[0]) ? entries[0] : null;
}

function isTokenEntry(e) {
    if (!e || typeof e !== "object") return false;
    if (!isPair(e.grid) || !isPositiveCount(e.codebook) || !isCount(e.used) || e.used > e.codebook) return false;
    if (e.histogram !== undefined && !(Array.isArray(e.histogram) && e.histogram.length > 0 && e.histogram.every(isCount))) return false;
    if (e.map !== undefined) {
        if (!isPair(e.map_grid) || !Array.isArray(e.map)) return false;
        if (e.map.length !== e.map_grid[0] * e.map_grid[1] || !e.map.every(isCount)) return false;
    }
    return true;
}

function isTileEntry(e) {
    if (!e || typeof e !== "object") return false;
    if (!isPair(e.grid) || !isPositiveCount(e.tile_px) || !isNumber(e.ms_per_tile) || e.ms_per_tile < 0) return false;
    if (e.image_px !== undefined && !isPair(e.image_px)) return false;
    return true;
}

function isSamplerEntry(e) {
    if (!e || typeof e !== "object") return false;
    if (!isPositiveCount(e.steps) || !isNumber(e.steps_per_s) || e.steps_per_s < 0) return false;
    return e.mode === undefined || typeof e.mode === "string";
}

function tokenSection(entries) {
    const e = firstValidEntry(entries, isTokenEntry);
    if (!e) return null;
    const [h, w] = e.grid;
    const usage = `${formatCount(e.used)} / ${formatCount(e.codebook)} codes used (${formatPercent(e.used / e.codebook)})`;
    return {
        lines: [`Tokens ${h}×${w}${moreSuffix(entries)}`, usage],
        histogram: e.histogram ?? null,
        map: e.map ? { rows: e.map_grid[0], cols: e.map_grid[1], values: e.map, codebook: e.codebook } : null,
    };
}

function tileSection(entries) {
    const e = firstValidEntry(entries, isTileEntry);
    if (!e) return null;
    const [rows, cols] = e.grid;
    return {
        lines: [
            `Tiles ${rows}×${cols} = ${rows * cols}${moreSuffix(entries)}`,
            `${e.tile_px} px tiles · ${formatDuration(e.ms_per_tile)}/tile`,
        ],
        tiles: { rows, cols, aspect: e.image_px ? e.image_px[1] / e.image_px[0] : cols / rows },
    };
}

function samplerSection(entries) {
    const e = firstValidEntry(entries, isSamplerEntry);
    if (!e) return null;
    const mode = e.mode ? ` (${e.mode})` : "";
    return { lines: [`${e.steps} steps${mode} · ${formatRate(e.steps_per_s)} steps/s${moreSuffix(entries)}`] };
}

// Output of a node execution -> list of sections to show, or null when nothing in it is ours.
export function panelFromOutput(output) {
    if (!output || typeof output !== "object") return null;
    const sections = [
        tokenSection(output.vqcore_tokens),
        tileSection(output.vqcore_tiles),
        samplerSection(output.vqcore_sampler),
    ].filter(Boolean);
    return sections.length ? sections : null;
}

function histogramOps(histogram, x, y, width) {
    const max = Math.max(...histogram);
    const barWidth = width / histogram.length;
    return histogram.map((count, i) => {
        const h = max > 0 ? Math.max(1, Math.round((count / max) * HISTOGRAM_HEIGHT)) : 1;
        return {
            op: "rect",
            x: x + i * barWidth,
            y: y + HISTOGRAM_HEIGHT - h,
            w: Math.max(1, barWidth - (barWidth > 3 ? 1 : 0)),
            h,
            fill: count > 0 ? COLORS.bar : COLORS.barEmpty,
        };
    });
}

// Largest box of this aspect (width / height) within the drawing limits.
function drawingBox(aspect, maxHeight) {
    let h = maxHeight;
    let w = h * aspect;
    if (w > MAX_DRAWING_WIDTH) {
        w = MAX_DRAWING_WIDTH;
        h = w / aspect;
    }
    return { w, h };
}

function mapOps(map, x, y) {
    const { w, h } = drawingBox(map.cols / map.rows, MAX_MAP_HEIGHT);
    const cw = w / map.cols;
    const ch = h / map.rows;
    const ops = map.values.map((token, i) => ({
        op: "rect",
        x: x + (i % map.cols) * cw,
        y: y + Math.floor(i / map.cols) * ch,
        w: cw,
        h: ch,
        fill: colorForToken(token, map.codebook),
    }));
    return { ops, w, h };
}

function tileGridOps(tiles, x, y) {
    const { w, h } = drawingBox(tiles.aspect, MAX_TILE_GRID_HEIGHT);
    const ops = [];
    for (let r = 0; r < tiles.rows; r++) {
        for (let c = 0; c < tiles.cols; c++) {
            const cell = { x: x + (c * w) / tiles.cols, y: y + (r * h) / tiles.rows, w: w / tiles.cols, h: h / tiles.rows };
            ops.push({ op: "rect", ...cell, fill: COLORS.tile }, { op: "strokeRect", ...cell, stroke: COLORS.frame });
        }
    }
    return { ops, w, h };
}

export function estimateTextWidth(text) {
    return text.length * CHAR_WIDTH;
}

// Sections -> {width, height, ops}: the panel is sized to its content, ops are in panel coordinates
// (0,0 = panel top-left; text y is the baseline). `measureText(text)` gives the width of a line in FONT.
export function layoutPanel(sections, measureText = estimateTextWidth) {
    const ops = [];
    let inner = 0;
    let y = PADDING;
    for (const section of sections) {
        for (const line of section.lines) {
            y += LINE_HEIGHT;
            ops.push({ op: "text", x: PADDING, y: y - 4, text: line, fill: COLORS.text });
            inner = Math.max(inner, measureText(line));
        }
        if (section.histogram) {
            y += 2;
            ops.push({ op: "histogram", y, values: section.histogram });
            inner = Math.max(inner, MIN_HISTOGRAM_WIDTH);
            y += HISTOGRAM_HEIGHT;
        }
        for (const drawing of [section.map && mapOps(section.map, PADDING, y + 4),
                               section.tiles && tileGridOps(section.tiles, PADDING, y + 4)]) {
            if (!drawing) continue;
            ops.push(...drawing.ops);
            inner = Math.max(inner, drawing.w);
            y += drawing.h + 4;
        }
        y += PADDING;
    }
    inner = Math.ceil(inner);
    // Histograms span the panel's full inner width, known only now.
    const expanded = ops.flatMap((op) => op.op === "histogram" ? histogramOps(op.values, PADDING, op.y, inner) : [op]);
    return { width: inner + 2 * PADDING, height: Math.ceil(y), ops: expanded };
}
