// The OpenAI-compatible HTTP API as the page uses it: list models, stream a chat completion.
import { sseData } from "./sse.js";

/** An error to show the user: the server's own message when it sent one. */
export class ApiError extends Error {
  constructor(message, status = null, { code = null, param = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code; // the OpenAI error's code and param, when the server gave them
    this.param = param;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  // fetch() refuses a header past Latin-1 with a TypeError, which read as "could not reach the server"
  const unsendable = /[^\u0000-\u00ff]/u.exec(apiKey ?? "");
  if (unsendable) {
    const code = unsendable[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    const why = "which an HTTP header cannot carry: retype the key";
    throw new ApiError(`the API key in Settings holds U+${code}, ${why}`);
  }
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

// HTTP/2 has no reason phrase (statusText is empty): behind a proxy that speaks it, a bare "502" was all
// the page said of an error whose body is the proxy's HTML page.
const REASONS = {
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  408: "Request Timeout",
  413: "Content Too Large",
  429: "Too Many Requests",
  500: "Internal Server Error",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
};

/** Turn a non-2xx response into an ApiError carrying `{"error": {"message": ...}}` from the body. */
async function failure(response) {
  const { status } = response;
  const reason = response.statusText || REASONS[status] || (status >= 500 ? "Server Error" : "Error");
  let message = `${status} ${reason}`;
  let body = null;
  try {
    body = await response.json();
    const detail = body?.error?.message ?? body?.detail ?? body?.message;
    if (detail) message = `${message}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
  } catch {
    // Not JSON (a proxy's HTML page, say): the status line is all there is.
  }
  return new ApiError(message, response.status, { code: body?.error?.code, param: body?.error?.param });
}

/** The ids of the served models (GET v1/models). */
export async function listModels(apiKey) {
  const response = await fetch("v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  return (body.data ?? []).map((m) => m.id);
}

/**
 * POST v1/chat/completions with `stream: true` and yield each parsed chunk object.
 * Ends at `data: [DONE]`; an `{"error": ...}` event, or a stream that closes before [DONE], throws.
 * Aborting `signal` closes the connection, which makes the server abort the request.
 */
export async function* streamChat(body, { apiKey, signal }) {
  const response = await fetch("v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const broken = "the connection closed before the answer finished";
  try {
    for await (const data of sseData(response.body)) {
      if (data.startsWith("[DONE]")) return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new ApiError(`the server sent an event that is not JSON: ${data.slice(0, 80)}`);
      }
      if (chunk?.error) throw new ApiError(chunk.error.message || "the server reported an error while streaming");
      yield chunk;
    }
  } catch (error) {
    // The body broke off (the server went away, the network dropped): the browser's "network error" came
    // out as "could not reach the server", about a server that had been answering. Aborts pass through.
    if (error instanceof TypeError) throw new ApiError(`${broken} (${error.message})`);
    throw error;
  }
  throw new ApiError(broken);
}
