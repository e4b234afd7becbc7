// Model output is untrusted text: markdown becomes HTML through marked (HTML in the text stays text), and
// that HTML is sanitized by DOMPurify before it reaches the page. The page's Content-Security-Policy
// forbids inline scripts as well.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

marked.setOptions({ gfm: true, breaks: true });

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

// HTML the model writes is shown as the text it is, as chat pages do: rendered, the tags in an answer
// about HTML vanished ("center a <div>" lost the word) and a <title> or <head> took the rest of the
// answer with it. Only the markdown's own markup is HTML, and DOMPurify still checks all of it.
marked.use({ renderer: { html: ({ text }) => escapeHtml(text) } });

// No remote images, forms or embedded documents from a model: an image URL can carry the conversation away.
const SANITIZE = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
  FORBID_ATTR: ["style"],
};

// Arabic or Hebrew reads right to left: each block takes the direction of its own first strong letter, as
// the browser decides for dir="auto" (an answer may mix languages paragraph by paragraph). Code is left
// to right.
const OWN_DIRECTION = new Set(
  ["P", "LI", "H1", "H2", "H3", "H4", "H5", "H6", "BLOCKQUOTE", "TD", "TH", "DT", "DD"],
);

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (OWN_DIRECTION.has(node.tagName)) node.setAttribute("dir", "auto");
  else if (node.tagName === "PRE") node.setAttribute("dir", "ltr");
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Replace `element`'s content with `markdown` rendered and sanitized. */
export function renderMarkdown(element, markdown) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(markdown), SANITIZE);
}

/**
 * Split Qwen3-style thinking from the answer: `<think>...</think>` at the start of the text
 * (the closing tag may not have arrived yet while streaming).
 */
export function splitThinking(text) {
  const match = /^\s*<think>([\s\S]*?)(<\/think>|$)/.exec(text);
  if (!match) return { thinking: null, answer: text, thinkingDone: true };
  return {
    thinking: match[1].trim(),
    answer: text.slice(match[0].length).replace(/^\s+/, ""),
    thinkingDone: match[2] !== "",
  };
}
