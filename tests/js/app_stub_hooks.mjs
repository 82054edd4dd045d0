// Module-resolution hook for the tests: the extension imports the host app through the relative path that
// resolves to /scripts/app.js in the browser; here that path is answered by the stand-in in app_stub.mjs.
const STUB_URL = new URL("./app_stub.mjs", import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
    if (specifier.endsWith("/scripts/app.js")) return { url: STUB_URL, shortCircuit: true };
    return nextResolve(specifier, context);
}
