// Server-Sent Events read from a fetch() body. EventSource cannot POST nor send headers, so
// the page parses the stream itself, by the rules of the HTML standard ("Parsing an event
// stream"): lines end with CRLF, LF or CR; a blank line dispatches the event; a line starting
// with ":" is a comment; "field: value" loses one space after the colon; "data" lines are
// joined with LF; the last event id persists across events; an event with no data is not
// dispatched, nor is an unfinished one at the end of the stream.

export class EventParser {
  #buffer = "";
  #type = "";
  #data = [];
  lastEventId = "";

  /** Feed decoded text; returns the events it completed, as {type, data, id}. */
  feed(text) {
    const events = [];
    const buffer = this.#buffer + text;
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer[i];
      if (c !== "\n" && c !== "\r") continue;
      if (c === "\r" && i + 1 === buffer.length) break; // an LF may start the next chunk
      const line = buffer.slice(start, i);
      if (c === "\r" && buffer[i + 1] === "\n") i++;
      start = i + 1;
      this.#line(line, events);
    }
    this.#buffer = buffer.slice(start);
    return events;
  }

  #line(line, events) {
    if (line === "") {
      if (this.#data.length > 0) {
        events.push({ type: this.#type || "message", data: this.#data.join("\n"), id: this.lastEventId });
      }
      this.#type = "";
      this.#data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.#type = value;
    else if (field === "data") this.#data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    // "retry" and unknown fields are ignored: this reader does not reconnect by itself.
  }
}

/** The events of a response body, as they arrive. */
export async function* readEvents(body) {
  // TextDecoderStream drops a leading byte order mark, as the standard asks.
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      yield* parser.feed(value);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
