// Thin front-end layer: gives each vqcore node a panel that shows what it reported in its `ui` output (token
// usage, tile grid, sampler speed). All decisions live in vqcore_panels.js; this file only hooks the node
// instance and turns the drawing operations it is given into an SVG.
//
// The panel is a DOM widget because both of the front end's renderers show those: the classic canvas lays it
// out in the node's widget stack and places the element over the canvas, Nodes 2.0 (Vue nodes, which never
// call onDrawForeground) mounts the element among the node's widgets. It is added when the node is created,
// after the node's own widgets and before the image preview that a run adds, so the preview is laid out below
// it instead of over it.
import { app } from "../../scripts/app.js";
import { FONT, layoutPanel, panelFromOutput } from "./vqcore_panels.js";

const NODE_PREFIX = "VQCore";
export const PANEL_WIDGET = "vqcore_panel";
const SVG_NS = "http://www.w3.org/2000/svg";

let measureContext = null;

function measureText(text) {
    measureContext ??= document.createElement("canvas").getContext("2d");
    measureContext.font = FONT;
    return measureContext.measureText(text).width;
}

function svgElement(tag, attributes, style) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
    Object.assign(element.style, style);
    return element;
}

// One SVG for the whole panel: crisp at every zoom level, and its text is real text.
function renderPanel(element, layout) {
    if (!layout) {
        element.replaceChildren();
        return;
    }
    const { width, height } = layout;
    const svg = svgElement("svg", { width, height, viewBox: `0 0 ${width} ${height}` },
                           { display: "block", font: FONT, shapeRendering: "crispEdges" });
    for (const op of layout.ops) {
        if (op.op === "text") {
            const text = svgElement("text", { x: op.x, y: op.y }, { fill: op.fill });
            text.textContent = op.text;
            svg.append(text);
        } else {
            const box = { x: op.x, y: op.y, width: op.w, height: op.h };
            svg.append(op.op === "rect" ? svgElement("rect", box, { fill: op.fill })
                                        : svgElement("rect", box, { fill: "none", stroke: op.stroke }));
        }
    }
    element.replaceChildren(svg);
}

export function attachPanel(node) {
    const element = document.createElement("div");
    element.className = "vqcore-panel";
    let layout = null;
    const height = () => layout?.height ?? 0;
    // Not a value: kept out of the saved workflow and the prompt. No margin, so that a node without a panel
    // yet gets no empty box; the panel's own padding keeps it off the node's edges.
    const widget = node.addDOMWidget(PANEL_WIDGET, PANEL_WIDGET, element, {
        serialize: false,
        hideOnZoom: false,
        margin: 0,
        getMinHeight: height,
        getMaxHeight: height,
    });
    widget.serialize = false;

    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const sections = panelFromOutput(output);
        layout = sections ? layoutPanel(sections, measureText) : null;
        renderPanel(element, layout);
        const [minWidth, minHeight] = this.computeSize();
        this.setSize([Math.max(this.size[0], minWidth), Math.max(this.size[1], minHeight)]);
        this.setDirtyCanvas?.(true, true);
    };

    // The panel sets the node's minimum width (its height enters through the widget's minimum height).
    const computeSize = node.computeSize;
    node.computeSize = function (...args) {
        const size = computeSize.apply(this, args);
        if (layout) size[0] = Math.max(size[0], layout.width);
        return size;
    };
}

app.registerExtension({
    name: "vqcore.panels",
    nodeCreated(node) {
        if (typeof node.comfyClass === "string" && node.comfyClass.startsWith(NODE_PREFIX)) {
            attachPanel(node);
        }
    },
});
