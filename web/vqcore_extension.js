// Thin front-end layer: attaches a panel to vqcore nodes that shows what they reported in their `ui`
// output (token usage, tile grid, sampler speed). All decisions live in vqcore_panels.js; this file only
// hooks the node instance and paints the operations it is given.
import { app } from "../../scripts/app.js";
import { layoutPanel, panelFromOutput } from "./vqcore_panels.js";

const NODE_PREFIX = "VQCore";

function paint(ctx, ops, top) {
    ctx.save();
    ctx.font = "12px sans-serif";
    ctx.textAlign = "left";
    for (const op of ops) {
        if (op.op === "text") {
            ctx.fillStyle = op.fill;
            ctx.fillText(op.text, op.x, top + op.y);
        } else if (op.op === "rect") {
            ctx.fillStyle = op.fill;
            ctx.fillRect(op.x, top + op.y, op.w, op.h);
        } else if (op.op === "strokeRect") {
            ctx.strokeStyle = op.stroke;
            ctx.strokeRect(op.x, top + op.y, op.w, op.h);
        }
    }
    ctx.restore();
}

// Layout for the node's current width, recomputed only when the width or the data changes.
function currentLayout(node) {
    const panel = node.vqcorePanel;
    if (!panel) return null;
    const width = node.size[0];
    if (!panel.layout || panel.width !== width) {
        panel.layout = layoutPanel(panel.sections, width);
        panel.width = width;
    }
    return panel.layout;
}

export function attachPanel(node) {
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const sections = panelFromOutput(output);
        this.vqcorePanel = sections ? { sections, layout: null, width: 0 } : null;
        if (sections) {
            // Widen first: the panel's height is final only at its minimum width.
            this.setSize([Math.max(this.size[0], this.computeSize()[0]), this.size[1]]);
            this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
        }
        this.setDirtyCanvas?.(true, true);
    };

    // The panel sits at the bottom of the node; it sets the node's minimum width and adds to its minimum height.
    const computeSize = node.computeSize;
    node.computeSize = function (...args) {
        const size = computeSize.apply(this, args);
        const layout = currentLayout(this);
        if (layout) {
            size[0] = Math.max(size[0], layout.minWidth);
            size[1] += layout.height;
        }
        return size;
    };

    const onDrawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx, ...rest) {
        onDrawForeground?.call(this, ctx, ...rest);
        const layout = currentLayout(this);
        if (!layout || this.flags?.collapsed) return;
        paint(ctx, layout.ops, this.size[1] - layout.height);
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
