// Server-sent events over a fetch() body. EventSource cannot POST, so the page parses the stream itself,
// following the WHATWG rules: lines end at \r\n, \r or \n; a blank line ends an event; several `data:`
// lines join with \n; one space after the colon is dropped; lines starting with ':' are comments (pings).

/** Yield the data string of each event in `body` (a ReadableStream of bytes). */
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let ended = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        ended = true;
        break;
      }
      buffer += value;
      let start = 0;
      for (let i = 0; i < buffer.length; i++) {
        const c = buffer[i];
        if (c !== "\n" && c !== "\r") continue;
        // A \r at the end of what has arrived may be the first half of \r\n: wait for more.
        if (c === "\r" && i + 1 === buffer.length) break;
        const line = buffer.slice(start, i);
        if (c === "\r" && buffer[i + 1] === "\n") i++;
        start = i + 1;
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "data") data.push(text);
        }
      }
      buffer = buffer.slice(start);
    }
  } finally {
    // The consumer stopped early (it saw [DONE], or gave up): close the connection instead of leaving it open.
    if (!ended) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
  // An event not ended by a blank line before the stream closed is incomplete: the spec drops it.
}
