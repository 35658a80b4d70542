// Server-sent events read from a fetch() body, as the HTML standard parses them.
// EventSource cannot send a POST body or an Authorization header, so the
// playground reads the stream itself.

/** Turns text, fed in any pieces, into events: {type, data, id}. */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.lastId = "";
  }

  /** Feed the next piece of text; returns the events it completed. */
  push(text) {
    this.buffer += text;
    const events = [];
    for (;;) {
      const end = this.buffer.search(/[\r\n]/);
      if (end < 0) break;
      // A "\r" at the very end may be the first half of "\r\n": wait for more.
      if (this.buffer[end] === "\r" && end === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, end);
      const width = this.buffer.startsWith("\r\n", end) ? 2 : 1;
      this.buffer = this.buffer.slice(end + width);
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }

  /** The stream ended: an event not closed by a blank line is dropped, as the standard says. */
  end() {
    const events = [];
    if (this.buffer.endsWith("\r")) {
      const event = this.line(this.buffer.slice(0, -1));
      if (event) events.push(event);
    }
    this.buffer = "";
    this.data = [];
    this.type = "";
    return events;
  }

  line(line) {
    if (line === "") {
      if (this.data.length === 0) {
        this.type = "";
        return null;
      }
      const event = { type: this.type || "message", data: this.data.join("\n"), id: this.lastId };
      this.data = [];
      this.type = "";
      return event;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
    return null;
  }
}

/** Every event of a response body (a ReadableStream of bytes), as they arrive. */
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield* parser.push(value);
    }
    yield* parser.end();
  } finally {
    // Stops the transfer when the reader leaves early ([DONE], Stop, an error).
    reader.cancel().catch(() => {});
  }
}
