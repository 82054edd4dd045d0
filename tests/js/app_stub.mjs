// Stand-in for ComfyUI's `app`: records the extensions registered with it.
export const app = {
    extensions: [],
    registerExtension(extension) {
        this.extensions.push(extension);
    },
};
