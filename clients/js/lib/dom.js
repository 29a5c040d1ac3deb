// A DOM for React tests: import this module before react-dom and @testing-library/react.
// Only DOM globals are installed; fetch, streams and AbortController stay Node's own.
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", {
  url: "http://localhost/",
  pretendToBeVisual: true,
});
const { window } = dom;

const define = (name, value) =>
  Object.defineProperty(globalThis, name, { value, configurable: true, writable: true });

define("window", window);
define("document", window.document);
define("navigator", window.navigator);
for (const name of [
  "HTMLElement",
  "HTMLDivElement",
  "Element",
  "Node",
  "Text",
  "DocumentFragment",
  "MutationObserver",
  "getComputedStyle",
  "requestAnimationFrame",
  "cancelAnimationFrame",
  "sessionStorage",
  "localStorage",
]) {
  define(name, window[name]);
}
// Most updates arrive from network streams, outside act(): like a browser, not an act()
// environment. @testing-library/react still wraps its own render/unmount in act().
define("IS_REACT_ACT_ENVIRONMENT", false);

export { window };
