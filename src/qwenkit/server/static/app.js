// The chat page: a transcript, a composer, and settings kept in this browser.
// The conversation lives here (`history`) and the whole of it is sent with every turn, as the API expects.
import { ApiError, listModels, streamChat } from "./api.js";
import { MarkdownStream, splitThinking } from "./render.js";

const $ = (id) => document.getElementById(id);
const transcript = $("transcript");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const errorBox = $("error");
const modelLabel = $("model");
const modelPick = $("model-pick");
const apiKeyInput = $("api-key");
const systemInput = $("system");

// Sampling fields: element ids = request fields. Blank means "the model's own default".
const SAMPLING = ["temperature", "top_p", "top_k", "max_tokens", "seed"];
const SETTINGS_KEY = "qwenkit.chat.settings";
const API_KEY_KEY = "qwenkit.chat.apiKey";
const MODEL_KEY = "qwenkit.chat.model";

let history = []; // [{role, content}], without the system prompt (it is read from its box at each send)
let modelId = null;
let running = null; // the AbortController of the answer being streamed
let conversation = 0; // bumped by "New chat", so an answer still finishing cannot touch the new one

// ---- settings, kept in localStorage -------------------------------------------------------------

// Storage can be switched off (private modes, blocked site data): then settings last for this page only.
const store = {
  get(key) {
    try {
      return localStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      if (value) localStorage.setItem(key, value);
      else localStorage.removeItem(key);
    } catch {
      // Not stored; the page keeps working.
    }
  },
};

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(store.get(SETTINGS_KEY) ?? "{}") ?? {};
  } catch {
    // A damaged entry: start from defaults.
  }
  systemInput.value = saved.system ?? "";
  for (const field of SAMPLING) $(field).value = saved[field] ?? "";
  apiKeyInput.value = store.get(API_KEY_KEY) ?? "";
}

function saveSettings() {
  const settings = { system: systemInput.value };
  for (const field of SAMPLING) settings[field] = $(field).value;
  store.set(SETTINGS_KEY, JSON.stringify(settings));
}

function saveApiKey() {
  store.set(API_KEY_KEY, apiKeyInput.value);
}

/** The sampling fields the user filled in, as numbers; a field the browser marks invalid is an error. */
function readSampling() {
  const params = {};
  for (const field of SAMPLING) {
    const input = $(field);
    if (!input.checkValidity()) {
      const label = document.querySelector(`label[for="${field}"]`).textContent.trim();
      throw new ApiError(`${label}: ${input.validationMessage}`);
    }
    // the number the browser read, as typed: parseInt("1e3") was 1 (a field takes 1e3 as 1000)
    if (input.value !== "") params[field] = input.valueAsNumber;
  }
  return params;
}

// ---- transcript ----------------------------------------------------------------------------------

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

function nearBottom() {
  return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
}

function addMessage(role) {
  $("empty")?.remove();
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : modelId || "Assistant";
  const body = document.createElement("div");
  body.className = role === "user" ? "body plain" : "body markdown";
  if (role === "user") body.dir = "auto"; // an answer's blocks each take their own direction (render.js)
  article.append(who, body);
  transcript.append(article);
  return { article, body };
}

/** An assistant message that draws at most once per frame while text streams in. */
class AnswerView {
  constructor() {
    const { article, body } = addMessage("assistant");
    this.article = article;
    this.body = body;
    this.thinking = document.createElement("details");
    this.thinking.className = "thinking";
    this.thinking.hidden = true;
    this.thinking.innerHTML = "<summary>Thinking</summary><div class='markdown'></div>";
    body.before(this.thinking);
    this.summary = this.thinking.querySelector("summary");
    this.thought = new MarkdownStream(this.thinking.querySelector("div"));
    this.answer = new MarkdownStream(body);
    this.meta = document.createElement("p");
    this.meta.className = "meta";
    article.append(this.meta);
    this.setState("waiting");
    this.frame = null; // the pending animation frame that will re-render, if any
  }

  setState(state) {
    this.article.dataset.state = state;
    this.article.setAttribute("aria-busy", String(state === "waiting" || state === "streaming"));
  }

  update(content, reasoning) {
    this.content = content;
    this.reasoning = reasoning;
    this.frame ??= requestAnimationFrame(() => this.render());
  }

  render(last = false) {
    if (this.frame != null) cancelAnimationFrame(this.frame);
    this.frame = null;
    const follow = nearBottom();
    const { thinking, answer, thinkingDone } = splitThinking(this.content ?? "");
    const thought = [this.reasoning, thinking].filter(Boolean).join("\n\n");
    if (thought) {
      this.thinking.hidden = false;
      // "Thinking…" only while the answer runs: one that ended in its thinking (max_tokens, Stop) is over
      const ended = this.article.dataset.state !== "waiting" && this.article.dataset.state !== "streaming";
      const summary = ended || (thinkingDone && answer) ? "Thought" : "Thinking…";
      if (this.summary.textContent !== summary) this.summary.textContent = summary;
      if (last) this.thought.end(thought);
      else this.thought.update(thought);
    }
    if (last) this.answer.end(answer);
    else this.answer.update(answer);
    if (last && this.article.dataset.state === "done" && !answer.trim()) {
      // the model ended straight away (or said only whitespace): an empty bubble read as the page failing
      const note = document.createElement("p");
      note.className = "empty-answer";
      note.textContent = "(empty answer)";
      this.body.replaceChildren(note);
    }
    if (follow) transcript.scrollTop = transcript.scrollHeight;
  }

  finish(state, note, content, reasoning) {
    this.content = content;
    this.reasoning = reasoning;
    this.setState(state);
    // the note first: the render scrolls to the end of the transcript, which the note now ends ("Stopped.",
    // "Failed: ..." and the token counts sat below the fold)
    this.meta.textContent = note;
    this.render(true);
    for (const pre of this.body.querySelectorAll("pre")) addCopyButton(pre);
  }
}

/**
 * Put `text` on the clipboard. The Clipboard API exists only in secure contexts (https, localhost): a page
 * served to the local network over plain http (`--host 0.0.0.0`) copies with the older copy command, from a
 * hidden text area.
 */
async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const before = document.activeElement;
  const area = document.createElement("textarea");
  area.className = "visually-hidden";
  area.readOnly = true;
  area.value = text;
  document.body.append(area);
  area.focus({ preventScroll: true });
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } finally {
    area.remove();
    before?.focus();
  }
  if (!copied) throw new Error("the browser refused to copy");
}

function addCopyButton(pre) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    try {
      await copyText(pre.querySelector("code")?.textContent ?? pre.textContent);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed"; // clipboard access refused: said, not an unseen script error
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  pre.append(button);
}

const tokens = (n) => `${n} ${n === 1 ? "token" : "tokens"}`;

/** Token counts from the usage chunk, and the decode rate when the answer took long enough to time. */
function usageNote(usage, seconds) {
  if (!usage) return "";
  const timed = seconds >= 0.1 && usage.completion_tokens > 1;
  const rate = timed ? ` · ${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s` : "";
  const cached = usage.prompt_tokens_details?.cached_tokens;
  const prefix = cached ? ` (${cached} cached)` : "";
  return `${tokens(usage.completion_tokens)}${rate} · prompt ${tokens(usage.prompt_tokens)}${prefix}`;
}

/** Why an answer stopped at its length: "the max_tokens limit" was no help where Max tokens was blank. */
function cutOff(asked) {
  if (asked) return "Cut off at the max tokens set in Settings.";
  return "Cut off at the server's default length: Max tokens in Settings allows longer answers.";
}

// ---- one turn ------------------------------------------------------------------------------------

function setRunning(controller) {
  running = controller;
  // Stop hides when the answer ends: the keyboard focus on it would fall to the page's start
  if (!controller && document.activeElement === stopButton) prompt.focus();
  sendButton.hidden = Boolean(controller);
  stopButton.hidden = !controller;
  transcript.setAttribute("aria-busy", String(Boolean(controller)));
}

async function send(text) {
  clearError();
  let sampling;
  try {
    sampling = readSampling();
  } catch (error) {
    showError(error.message);
    return;
  }
  const system = systemInput.value.trim();
  history.push({ role: "user", content: text });
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history];
  const question = addMessage("user");
  question.body.textContent = text;
  prompt.value = "";
  autosize();
  const view = new AnswerView();
  transcript.scrollTop = transcript.scrollHeight;

  const controller = new AbortController();
  const turn = conversation;
  setRunning(controller);
  let content = "";
  let reasoning = "";
  let finishReason = null;
  let usage = null;
  let firstTokenAt = null;
  let outcome = "done";
  let failure = null;
  try {
    const request = { messages, ...sampling, stream_options: { include_usage: true } };
    if (modelId) request.model = modelId;
    const apiKey = apiKeyInput.value;
    for await (const chunk of streamChat(request, { apiKey, signal: controller.signal })) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta ?? {};
      if (delta.content) content += delta.content;
      if (delta.reasoning_content) reasoning += delta.reasoning_content;
      if (choice.finish_reason) finishReason = choice.finish_reason;
      if (content || reasoning) {
        firstTokenAt ??= performance.now();
        view.setState("streaming");
        view.update(content, reasoning);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") outcome = "stopped";
    else {
      outcome = "error";
      failure = error instanceof ApiError ? error.message : `could not reach the server: ${error.message}`;
      // the whole conversation is sent with every message: once it outgrows the model's window, every
      // message fails alike, however short, until the conversation starts over
      const outgrown = error.code === "context_length_exceeded" && error.param === "messages";
      if (outgrown && history.length > 1) failure += " The conversation is too long: New chat starts over.";
      // a server restarted with --api-key, or another key: the page's own field is where the key goes
      if (error.status === 401) failure += KEY_HINT;
      if (error.status === 404) refreshModel(); // the model asked for is gone (an adapter unloaded)
    }
  } finally {
    if (running === controller) setRunning(null);
  }
  if (turn !== conversation) return;

  if (!content && !reasoning && outcome !== "done") {
    // Nothing came back: take the turn back so the next message does not follow an unanswered one.
    history.pop();
    question.article.remove();
    view.article.remove();
    if (!prompt.value) prompt.value = text;
    autosize();
    if (failure) showError(failure);
    return;
  }
  history.push({ role: "assistant", content });
  const seconds = firstTokenAt ? (performance.now() - firstTokenAt) / 1000 : 0;
  let note = usageNote(usage, seconds);
  if (outcome === "stopped") note = "Stopped.";
  else if (outcome === "error") note = `Failed: ${failure}`;
  else if (finishReason === "length") note = `${cutOff(sampling.max_tokens !== undefined)} ${note}`;
  view.finish(outcome, note, content, reasoning);
  if (failure) showError(failure);
}

function stop() {
  running?.abort();
}

function newChat() {
  stop();
  setRunning(null);
  conversation += 1;
  history = [];
  transcript.replaceChildren(emptyHint());
  clearError();
  prompt.focus();
}

function emptyHint() {
  const p = document.createElement("p");
  p.id = "empty";
  p.className = "empty";
  p.textContent = "Send a message to start. The system prompt and sampling settings are under Settings.";
  return p;
}

// ---- model name ----------------------------------------------------------------------------------

const LISTING_FAILED = "Could not list models";
const KEY_HINT = " (set the API key in Settings)";

async function refreshModel() {
  try {
    const ids = await listModels(apiKeyInput.value);
    const kept = store.get(MODEL_KEY);
    modelId = ids.includes(kept) ? kept : (ids[0] ?? null);
    modelLabel.textContent = modelId ?? "no model";
    modelLabel.title = ids.join(", ");
    // several models (a base and its LoRA adapters): a picker instead of the name
    modelPick.replaceChildren(...ids.map((id) => new Option(id, id, false, id === modelId)));
    modelPick.hidden = ids.length < 2;
    modelLabel.hidden = ids.length >= 2;
    // the server is back (or the key now right): an earlier failure to list no longer holds
    if (errorBox.textContent.startsWith(LISTING_FAILED)) clearError();
  } catch (error) {
    modelId = null;
    modelLabel.textContent = "model unavailable";
    const hint = error.status === 401 ? KEY_HINT : "";
    showError(`${LISTING_FAILED}: ${error.message}${hint}`);
  }
}

// ---- wiring --------------------------------------------------------------------------------------

// adapters come and go on a server with runtime LoRA loading: look again when the page is come back to
window.addEventListener("focus", () => refreshModel());

modelPick.addEventListener("change", () => {
  modelId = modelPick.value;
  store.set(MODEL_KEY, modelId);
});

function autosize() {
  prompt.style.height = "auto";
  prompt.style.height = `${Math.min(prompt.scrollHeight, 240)}px`;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  // blank lines around the message and trailing spaces go; its first line keeps its indentation (code)
  const text = prompt.value.replace(/^\s*\n/, "").trimEnd();
  if (text.trim() && !running) send(text);
});

prompt.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line; never send in the middle of an IME composition. Safari sends
  // the Enter that picks a candidate after the composition ended, marked only by keyCode 229.
  const composing = event.isComposing || event.keyCode === 229;
  if (event.key === "Enter" && !event.shiftKey && !composing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && running) stop();
});
prompt.addEventListener("input", autosize);
stopButton.addEventListener("click", () => {
  stop();
  prompt.focus(); // the Stop button is about to hide; keep the keyboard in the composer
});
$("new-chat").addEventListener("click", newChat);

const settingsPanel = $("settings");
const settingsToggle = $("settings-toggle");
settingsToggle.addEventListener("click", () => {
  settingsPanel.hidden = !settingsPanel.hidden;
  settingsToggle.setAttribute("aria-expanded", String(!settingsPanel.hidden));
  if (!settingsPanel.hidden) systemInput.focus();
});
$("settings-form").addEventListener("submit", (event) => event.preventDefault());
$("settings-form").addEventListener("input", saveSettings);
apiKeyInput.addEventListener("input", saveApiKey);
apiKeyInput.addEventListener("change", () => {
  clearError();
  refreshModel();
});

loadSettings();
transcript.append(emptyHint());
refreshModel();
prompt.focus();
