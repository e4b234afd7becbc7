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
// A task list's boxes are form inputs, which the sanitizer drops (and the done and open items then looked
// alike): each is a character instead, which copies with the text. Images are never loaded (SANITIZE), and
// dropped whole they left no trace: each is a link named by its alt text, fetched only if followed.
marked.use({
  renderer: {
    html: ({ text }) => escapeHtml(text),
    checkbox: ({ checked }) => (checked ? "☑ " : "☐ "),
    image({ href, title, text, tokens, inLink }) {
      const alt = tokens?.length ? this.parser.parseInline(tokens) : escapeHtml(text || href);
      if (inLink) return `Image: ${alt}`; // a badge's picture: the link around it is the one to follow
      const hover = title ? ` title="${escapeHtml(title)}"` : "";
      return `<a href="${escapeHtml(href)}"${hover}>Image: ${alt}</a>`;
    },
    link({ tokens }) {
      for (const token of tokens ?? []) if (token.type === "image") token.inLink = true;
      return false; // marked's own link, around what the images above make of themselves
    },
  },
});

// LaTeX, which models write for math, is shown as written: there is no math renderer, and markdown took
// "\(" for an escaped "(", "\{" for "{", and the stars of "a*b*c" for emphasis. A span is $$...$$, \[...\],
// \(...\), or $...$ as pandoc reads it (no space inside either dollar, no digit after the closing one, so
// "$5 and $10" stay text).
const MATH = /^(?:\$\$[\s\S]+?\$\$|\\\[[\s\S]+?\\\]|\\\([\s\S]+?\\\)|\$(?=\S)[^$\n]*?[^\s\\]\$(?!\d))/;
marked.use({
  extensions: [
    {
      name: "math",
      level: "inline",
      start: (src) => src.match(/\$|\\[[(]/)?.index,
      tokenizer: (src) => (MATH.test(src) ? { type: "math", raw: MATH.exec(src)[0] } : undefined),
      renderer: ({ raw }) => `<code class="math">${escapeHtml(raw)}</code>`,
    },
  ],
});

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

const toHtml = (markdown) => DOMPurify.sanitize(marked.parse(markdown), SANITIZE);
const tokensToHtml = (tokens) => (tokens.length ? DOMPurify.sanitize(marked.parser(tokens), SANITIZE) : "");

/** Replace `element`'s content with `markdown` rendered and sanitized. */
export function renderMarkdown(element, markdown) {
  element.innerHTML = toHtml(markdown);
}

/**
 * Markdown that grows while it streams, shown in `element`. Redrawing the whole text each frame cost work
 * that grew with the answer and took away any selection the reader had made in it; here the blocks that
 * later text can no longer change keep their nodes, and only the open ones at the end are drawn again
 * (`morph`: what they show already stays). The end is checked against the whole text rendered at once.
 */
export class MarkdownStream {
  constructor(element) {
    this.element = element;
    this.reset();
  }

  reset() {
    this.element.replaceChildren();
    this.source = ""; // the markdown of the finished blocks
    this.html = ""; // their HTML, as shown
    this.live = []; // the nodes of the open blocks at the end
    this.liveHtml = "";
    this.whole = false; // a link reference definition seen: it may change any block, so all are compared
  }

  /** Show `markdown`, which usually extends the text shown before. */
  update(markdown) {
    markdown = markdown.replace(/\r\n?/g, "\n"); // as marked's lexer reads it: block boundaries line up
    if (this.whole) {
      morph(this.element, [...this.element.childNodes], parseHtml(toHtml(markdown)));
      return;
    }
    if (!markdown.startsWith(this.source)) this.reset();
    const tokens = marked.lexer(markdown.slice(this.source.length));
    if (Object.keys(tokens.links).length) {
      this.whole = true;
      this.update(markdown);
      return;
    }
    // A block is finished once two more blocks follow it: the next one alone may be a line still being
    // written, which can turn out to continue it ("Para\n#" is a heading after a paragraph, "Para\n#a"
    // one paragraph).
    let cut = tokens.length;
    for (let blocks = 0; cut > 0 && blocks < 2; ) if (tokens[--cut].type !== "space") blocks += 1;
    const done = cut > 0 ? tokensToHtml(tokens.slice(0, cut)) : "";
    const liveHtml = tokensToHtml(tokens.slice(cut));
    if (!done && liveHtml === this.liveHtml) return;
    const finished = parseHtml(done);
    const shown = morph(this.element, this.live, finished.concat(parseHtml(liveHtml)));
    this.live = shown.slice(finished.length);
    this.liveHtml = liveHtml;
    this.html += done;
    this.source += tokens
      .slice(0, cut)
      .map((token) => token.raw)
      .join("");
  }

  /** Show the whole of `markdown` as `renderMarkdown` does, keeping the nodes shown where they agree. */
  end(markdown) {
    this.update(markdown);
    const whole = toHtml(markdown);
    if (!this.whole && whole !== this.html + this.liveHtml) {
      morph(this.element, [...this.element.childNodes], parseHtml(whole));
    }
  }
}

/**
 * Make `old`, the last nodes of `parent`, into `fresh`, keeping the nodes that agree and, in the first that
 * differs, its own nodes that agree (the earlier items of a list, the text of a code block so far): a
 * selection there survives, and the work is the part that changed. Returns the nodes now shown.
 */
function morph(parent, old, fresh) {
  let same = 0;
  while (same < old.length && same < fresh.length && old[same].isEqualNode(fresh[same])) same += 1;
  const shown = [...old.slice(0, same)];
  let added = same;
  if (same < old.length && same < fresh.length && morphNode(old[same], fresh[same])) {
    shown.push(old[same]);
    added += 1;
    same += 1;
  }
  for (const node of old.slice(same)) node.remove();
  parent.append(...fresh.slice(added));
  return shown.concat(fresh.slice(added));
}

/** Make `node` into `like` in place if they are the same kind of node; false if they are not. */
function morphNode(node, like) {
  if (node.nodeType === Node.TEXT_NODE && like.nodeType === Node.TEXT_NODE) {
    // only past the text they share: a selection before that point stays (code's last line is drawn with
    // a line break after it, which the next token's text comes before)
    let same = 0;
    while (same < node.length && node.data[same] === like.data[same]) same += 1;
    node.replaceData(same, node.length - same, like.data.slice(same));
    return true;
  }
  if (node.nodeType !== Node.ELEMENT_NODE || node.tagName !== like.tagName) return false;
  const names = node.getAttributeNames();
  const likeNames = like.getAttributeNames();
  if (names.length !== likeNames.length) return false;
  if (likeNames.some((name) => node.getAttribute(name) !== like.getAttribute(name))) return false;
  morph(node, [...node.childNodes], [...like.childNodes]);
  return true;
}

function parseHtml(html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  return [...template.content.childNodes];
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
