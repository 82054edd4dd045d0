// Minimal stand-in for the browser's `document`: elements keep their attributes, style, children and text,
// enough to inspect the SVG the extension builds. Canvas text is measured at a fixed advance per character.
export const MEASURE_CHAR_WIDTH = 8;

class FakeElement {
    constructor(tag, namespace = null) {
        this.tagName = tag;
        this.namespaceURI = namespace;
        this.attributes = {};
        this.style = {};
        this.children = [];
        this.className = "";
        this.textContent = "";
    }

    setAttribute(name, value) {
        this.attributes[name] = value;
    }

    append(...children) {
        this.children.push(...children);
    }

    replaceChildren(...children) {
        this.children = children;
    }

    getContext() {
        return { font: "", measureText: (text) => ({ width: text.length * MEASURE_CHAR_WIDTH }) };
    }

    // Every descendant with this tag name, in document order.
    findAll(tag) {
        return this.children.flatMap((child) => [...(child.tagName === tag ? [child] : []), ...child.findAll(tag)]);
    }
}

export function installDocument() {
    globalThis.document = {
        createElement: (tag) => new FakeElement(tag),
        createElementNS: (namespace, tag) => new FakeElement(tag, namespace),
    };
}
