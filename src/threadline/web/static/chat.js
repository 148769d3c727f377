// One open conversation: its log of user bubbles and replies, and the streams that feed it.
//
// Every message sent is its own POST stream, which follows that message to the run that
// answers it (README, "Streaming"). Messages sent while a reply is generated merge: the
// server supersedes the run in flight and one run answers them all, so several streams end
// up reporting the same run. Replies are therefore drawn per run id, never per stream:
//
//   run.started    -> a reply placeholder for that run (once, whichever stream says it first)
//   text.delta     -> appended once per event id (every stream of the run repeats them)
//   run.superseded -> the partial reply is struck through, then removed
//   run.completed  -> the final text; "answers N messages" when it merged several
//   run.failed     -> the error (or "cancelled") and a retry button
//
// Sends are chained: a message is posted once the previous one is stored, so the server
// stores them in the order they were typed, and the first message of a new chat creates the
// session that the next ones join.

import { ApiError, getJSON, request } from "./api.js";
import { readEvents } from "./sse.js";

const HISTORY_PAGE = 500;
const SUPERSEDED_FADE_MS = 1200;
const ACTIVE = new Set(["thinking", "streaming"]);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/** The last page of a paginated listing: the newest rows, oldest first. */
async function lastPage(path, field, signal) {
  const sep = path.includes("?") ? "&" : "?";
  const first = await getJSON(`${path}${sep}page_size=${HISTORY_PAGE}`, { signal });
  const total = first.total ?? first.total_messages;
  const pages = Math.max(1, Math.ceil(total / HISTORY_PAGE));
  if (pages === 1) return { rows: first[field], hidden: 0, first };
  const last = await getJSON(`${path}${sep}page_size=${HISTORY_PAGE}&page=${pages}`, { signal });
  return { rows: last[field], hidden: (pages - 1) * HISTORY_PAGE, first };
}

class Bubble {
  constructor(text, state) {
    this.text = text;
    this.node = element("li", "msg user");
    this.node.append(element("div", "bubble", text), element("div", "meta"));
    this.setState(state);
  }

  setState(state, note = "") {
    this.node.dataset.state = state;
    const labels = { sending: "sending…", failed: note };
    this.node.querySelector(".meta").textContent = labels[state] ?? "";
  }

  setId(id) {
    this.id = id;
    this.node.dataset.messageId = id;
  }
}

class Reply {
  constructor(view, runId, messageIds) {
    this.view = view;
    this.runId = runId;
    this.messageIds = messageIds ?? [];
    this.seen = new Set(); // text.delta event ids
    this.deltas = 0;
    this.node = element("li", "msg run");
    this.node.dataset.runId = runId;
    this.bubble = element("div", "bubble");
    this.text = element("div", "text");
    this.tools = element("ul", "tools");
    this.bubble.append(this.tools, this.text);
    this.meta = element("div", "meta");
    this.node.append(this.bubble, this.meta);
    for (const [on, off] of [["mouseenter", "mouseleave"], ["focus", "blur"]]) {
      this.meta.addEventListener(on, () => this.highlight(true));
      this.meta.addEventListener(off, () => this.highlight(false));
    }
    this.setState("thinking");
  }

  get active() {
    return ACTIVE.has(this.state);
  }

  get gone() {
    return this.state === "superseded";
  }

  setState(state) {
    this.state = state;
    this.node.dataset.state = state;
    this.view.onChange();
  }

  cover(messageIds) {
    if (messageIds?.length) this.messageIds = messageIds;
    this.node.dataset.answers = String(this.messageIds.length);
  }

  delta(eventId, text) {
    if (this.gone || !this.active) return;
    if (eventId && this.seen.has(eventId)) return;
    if (eventId) this.seen.add(eventId);
    this.deltas += 1;
    this.node.dataset.deltas = String(this.deltas);
    this.text.textContent += text;
    if (this.state === "thinking") this.setState("streaming");
  }

  tool(label) {
    if (this.gone || [...this.tools.children].some((li) => li.textContent === label)) return;
    this.tools.append(element("li", "tool", label));
  }

  supersede() {
    if (this.gone) return;
    this.setState("superseded");
    this.meta.textContent = "superseded: merged into the next reply";
    setTimeout(() => this.node.remove(), SUPERSEDED_FADE_MS);
  }

  complete(message, messageIds, live = true) {
    if (this.gone) return;
    this.cover(messageIds);
    this.text.textContent = message;
    const n = this.messageIds.length;
    this.meta.textContent = n > 1 ? `answers ${plural(n, "message")}` : "";
    this.meta.tabIndex = n > 1 ? 0 : -1;
    this.meta.title = n > 1 ? "One reply to the messages sent while it was being written" : "";
    this.setState("completed");
    this.view.answered(this.messageIds, n > 1 ? "merged" : "answered");
    if (n > 1 && live) this.flash();
  }

  fail(error, messageIds) {
    if (this.gone) return;
    this.cover(messageIds);
    const cancelled = error?.code === "run_cancelled";
    this.setState(cancelled ? "cancelled" : "failed");
    this.meta.replaceChildren();
    const reason = cancelled ? "Cancelled" : `Failed: ${error?.message ?? "the run failed"}`;
    this.meta.append(element("span", "error", reason));
    if (!cancelled && error?.code) this.meta.append(element("code", "", ` ${error.code}`));
    const retry = element("button", "retry", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => this.view.retry(this.messageIds));
    this.meta.append(retry);
    this.view.answered(this.messageIds, "failed");
  }

  highlight(on) {
    for (const id of this.messageIds) this.view.bubbles.get(id)?.node.classList.toggle("highlight", on);
  }

  flash() {
    this.highlight(true);
    setTimeout(() => this.highlight(false), 1500);
  }
}

export class ChatView {
  /**
   * @param session  the session to show, or null for a new chat
   * @param agent    the agent a new chat talks to
   * @param ui       {log, userId(), onChange(view), onSession(view), onError(error)}
   */
  constructor(session, agent, ui) {
    this.session = session;
    this.agent = session?.agent ?? agent;
    this.ui = ui;
    this.log = ui.log;
    this.abort = new AbortController();
    this.bubbles = new Map(); // message id -> Bubble
    this.replies = new Map(); // run id -> Reply
    this.chain = Promise.resolve();
    this.superseded = 0;
  }

  get sessionId() {
    return this.session?.id ?? null;
  }

  close() {
    // Leaving a chat only stops listening: the server's runs go on (README, "Streaming").
    this.abort.abort();
  }

  get activeRun() {
    const active = [...this.replies.values()].filter((r) => r.active);
    return active.at(-1) ?? null;
  }

  onChange() {
    this.ui.onChange(this);
  }

  /** Render the stored history, then follow the messages still waiting for an answer. */
  async load() {
    const signal = this.abort.signal;
    const id = encodeURIComponent(this.sessionId);
    const [history, runs] = await Promise.all([
      lastPage(`api/v1/sessions/${id}`, "messages", signal),
      lastPage(`api/v1/sessions/${id}/runs`, "runs", signal),
    ]);
    this.session = history.first;
    this.agent = this.session.agent;
    const runsById = new Map(runs.rows.map((run) => [run.id, run]));
    const answered = new Set();
    const failedAfter = new Map(); // last message id of a failed run -> that run
    for (const run of runs.rows) {
      const closed =
        run.status === "succeeded" ||
        run.status === "failed" ||
        (run.status === "cancelled" && run.error_code === "run_cancelled");
      if (!closed) continue;
      for (const m of run.message_ids) answered.add(m);
      if (run.status !== "succeeded" && run.message_ids.length) failedAfter.set(run.message_ids.at(-1), run);
    }
    this.log.replaceChildren();
    if (history.hidden) this.log.append(element("li", "note", `${plural(history.hidden, "earlier message")} not shown`));
    const pending = [];
    for (const row of history.rows) {
      if (row.role === "user") {
        const bubble = this.#addBubble(row.content, "waiting");
        bubble.setId(row.id);
        this.bubbles.set(row.id, bubble);
        if (!answered.has(row.id)) pending.push(row.id);
        const failed = failedAfter.get(row.id);
        if (failed) this.#reply(failed.id, failed.message_ids).fail({ code: failed.error_code, message: failed.error }, failed.message_ids);
      } else if (row.role === "assistant" && row.run_id) {
        const run = runsById.get(row.run_id);
        this.#reply(row.run_id, run?.message_ids).complete(row.content, run?.message_ids, false);
      } else {
        this.log.append(element("li", "note", row.content));
      }
    }
    this.#scroll(true);
    for (const messageId of pending) this.#follow(messageId);
  }

  /** Send a message: its bubble shows at once; the POST waits for the previous one. */
  send(text) {
    const bubble = this.#addBubble(text, "sending");
    this.#scroll(true);
    const stored = this.chain.then(() => this.#post(text, bubble));
    this.chain = stored.catch(() => {});
  }

  retry(messageIds) {
    for (const id of messageIds) {
      const bubble = this.bubbles.get(id);
      if (bubble) this.send(bubble.text);
    }
  }

  async cancel() {
    const run = this.activeRun;
    if (!run) return;
    try {
      await request(`api/v1/runs/${encodeURIComponent(run.runId)}/cancel`, { method: "POST" });
    } catch (error) {
      // run_not_active: it ended on its own meanwhile; its stream says how.
      if (!(error instanceof ApiError && error.code === "run_not_active")) this.ui.onError(error);
    }
  }

  answered(messageIds, state) {
    for (const id of messageIds) this.bubbles.get(id)?.setState(state);
  }

  #addBubble(text, state) {
    const bubble = new Bubble(text, state);
    this.log.append(bubble.node);
    return bubble;
  }

  #reply(runId, messageIds) {
    let reply = this.replies.get(runId);
    if (!reply) {
      reply = new Reply(this, runId, messageIds);
      this.replies.set(runId, reply);
      // After the last message it answers, which is the end of the log but in a history.
      const last = messageIds?.length ? this.bubbles.get(messageIds.at(-1)) : null;
      if (last && last.node.isConnected) last.node.after(reply.node);
      else this.log.append(reply.node);
    }
    reply.cover(messageIds);
    return reply;
  }

  /** Resolves once the message is stored (or refused); its stream is read in the background. */
  #post(text, bubble) {
    return new Promise((stored) => {
      const body = { message_content: text, stream: true, user_id: this.ui.userId() };
      if (this.sessionId) body.session_id = this.sessionId;
      const path = `api/v1/agent/${encodeURIComponent(this.agent)}/run`;
      this.#consume(
        request(path, { method: "POST", body, accept: "text/event-stream", signal: this.abort.signal }),
        bubble,
        stored,
      );
    });
  }

  /** Join a stored message's stream: it was waiting for an answer when the page loaded. */
  #follow(messageId) {
    const path = `api/v1/messages/${encodeURIComponent(messageId)}/events`;
    this.#consume(request(path, { accept: "text/event-stream", signal: this.abort.signal }), this.bubbles.get(messageId));
  }

  async #consume(responding, bubble, stored = () => {}) {
    let ended = false;
    try {
      const response = await responding;
      for await (const event of readEvents(response.body)) {
        const data = JSON.parse(event.data);
        if (event.type === "message.accepted") {
          await this.#accepted(bubble, data);
          stored();
        } else {
          ended ||= event.type === "run.completed" || event.type === "run.failed";
          this.#event(event.type, data, event.id, bubble);
        }
      }
      if (!ended && !this.abort.signal.aborted) bubble?.setState("failed", "the stream ended early: reload to see the answer");
    } catch (error) {
      if (this.abort.signal.aborted) return;
      bubble?.setState("failed", error instanceof ApiError ? `${error.message} (${error.code})` : String(error));
      if (!(error instanceof ApiError)) this.ui.onError(error);
    } finally {
      stored();
    }
  }

  async #accepted(bubble, data) {
    bubble.setId(data.message_id);
    this.bubbles.set(data.message_id, bubble);
    if (bubble.node.dataset.state === "sending") bubble.setState("waiting");
    if (!this.session) {
      this.session = { id: data.session_id, agent: this.agent, name: null };
      await this.ui.onSession(this);
    }
  }

  #event(type, data, eventId, bubble) {
    const stick = this.#nearEnd();
    switch (type) {
      case "run.started":
        this.#reply(data.run_id, data.message_ids);
        break;
      case "text.delta":
        this.#reply(data.run_id).delta(eventId, data.delta);
        break;
      case "tool.call":
        this.#reply(data.run_id).tool(`${data.tool_name}(${JSON.stringify(data.args ?? {})})`);
        break;
      case "tool.result":
        this.#reply(data.run_id).tool(`${data.tool_name} → ${typeof data.content === "string" ? data.content : JSON.stringify(data.content)}`);
        break;
      case "run.superseded": {
        const reply = this.replies.get(data.run_id);
        if (reply && !reply.gone) this.superseded += 1;
        reply?.supersede();
        this.log.dataset.superseded = String(this.superseded);
        break;
      }
      case "run.completed":
        this.#reply(data.run_id, data.message_ids).complete(data.message, data.message_ids);
        break;
      case "run.failed":
        if (data.run_id) this.#reply(data.run_id, data.message_ids).fail(data.error, data.message_ids);
        else bubble?.setState("failed", `${data.error?.message} (${data.error?.code})`);
        break;
      default:
        return; // an event this page does not know yet
    }
    this.#scroll(stick);
  }

  #nearEnd() {
    const scroller = this.log.parentElement;
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  }

  #scroll(stick) {
    if (!stick) return;
    const scroller = this.log.parentElement;
    scroller.scrollTop = scroller.scrollHeight;
  }
}
