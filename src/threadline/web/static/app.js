// The chat page: agents and sessions in the sidebar, one ChatView in the main pane, the
// composer, and the API-key prompt. The open session lives in the URL (#/session/<id>), so a
// reload shows the same conversation; the user id lives in localStorage.

import { getJSON, setKeyPrompt } from "./api.js";
import { ChatView } from "./chat.js";

const USER_STORAGE = "threadline.userId";
const AGENT_STORAGE = "threadline.agent";
const SESSION_ROUTE = /^#\/session\/([^/]+)$/;

const $ = (id) => document.getElementById(id);
const ui = {
  agent: $("agent"),
  agentDescription: $("agent-description"),
  sessions: $("sessions"),
  userId: $("user-id"),
  newChat: $("new-chat"),
  menu: $("menu"),
  title: $("title"),
  subtitle: $("subtitle"),
  banner: $("banner"),
  log: $("log"),
  composer: $("composer"),
  input: $("input"),
  stop: $("stop"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  keyNote: $("key-note"),
};

let agents = [];
let view = null;

function userId() {
  let id = localStorage.getItem(USER_STORAGE);
  if (!id) {
    id = `web-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem(USER_STORAGE, id);
  }
  return id;
}

function showError(error) {
  if (!error) {
    ui.banner.hidden = true;
    return;
  }
  ui.banner.textContent = error.code ? `${error.message} (${error.code})` : String(error.message ?? error);
  ui.banner.hidden = false;
}

function sessionLabel(session) {
  const when = new Date(session.created_at ?? Date.now()).toLocaleString(undefined, {
    dateStyle: "short",
    timeStyle: "short",
  });
  return session.name ?? `${session.agent} · ${when}`;
}

async function loadAgents() {
  agents = await getJSON("api/v1/agents");
  const saved = localStorage.getItem(AGENT_STORAGE);
  ui.agent.replaceChildren(
    ...agents.map((a) => {
      const option = new Option(a.name, a.name);
      option.title = a.description;
      return option;
    }),
  );
  if (agents.some((a) => a.name === saved)) ui.agent.value = saved;
  describeAgent();
}

function describeAgent() {
  const agent = agents.find((a) => a.name === ui.agent.value);
  ui.agentDescription.textContent = agent ? `${agent.description} (${agent.model})` : "";
}

async function loadSessions() {
  const page = await getJSON(`api/v1/sessions?user_id=${encodeURIComponent(userId())}&page_size=100`);
  ui.sessions.replaceChildren(
    ...page.sessions.map((session) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#/session/${session.id}`;
      link.textContent = sessionLabel(session);
      link.dataset.sessionId = session.id;
      if (session.id === view?.sessionId) link.setAttribute("aria-current", "page");
      item.append(link);
      return item;
    }),
  );
  if (!page.sessions.length) {
    const empty = document.createElement("li");
    empty.className = "muted";
    empty.textContent = "No sessions yet: send a message.";
    ui.sessions.append(empty);
  }
}

function markCurrent() {
  for (const link of ui.sessions.querySelectorAll("a")) {
    if (link.dataset.sessionId === view?.sessionId) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function showTitle() {
  ui.title.textContent = view.session ? sessionLabel(view.session) : "New chat";
  ui.subtitle.textContent = `with ${view.agent}`;
  document.title = view.session ? `${ui.title.textContent} · threadline` : "threadline";
}

function updateControls(current) {
  if (current !== view) return;
  ui.stop.hidden = !view.activeRun;
}

/** Open the chat the URL names (or a new one), replacing the one shown. */
async function route() {
  const match = SESSION_ROUTE.exec(location.hash);
  const sessionId = match ? decodeURIComponent(match[1]) : null;
  if (view && view.sessionId === sessionId && sessionId !== null) return;
  view?.close();
  showError(null);
  view = new ChatView(sessionId ? { id: sessionId } : null, ui.agent.value, {
    log: ui.log,
    userId,
    onChange: updateControls,
    onSession: async (v) => {
      // The first message created the session: name it in the URL without reopening it.
      history.replaceState(null, "", `#/session/${v.sessionId}`);
      if (v === view) showTitle();
      await loadSessions().catch(showError);
    },
    onError: showError,
  });
  ui.log.replaceChildren();
  updateControls(view);
  markCurrent();
  document.body.classList.remove("sidebar-open");
  if (sessionId) {
    const opening = view;
    try {
      await opening.load();
    } catch (error) {
      if (opening === view) showError(error);
      return;
    }
    if (opening !== view) return;
    ui.agent.value = view.agent;
    describeAgent();
  }
  showTitle();
  ui.input.focus();
}

function send() {
  const text = ui.input.value;
  if (!text.trim()) return;
  ui.input.value = "";
  resizeInput();
  view.send(text);
}

function resizeInput() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

/** Ask for the API key (the server answered 401); resolves with what the user typed. */
function askForKey(refused) {
  ui.keyNote.hidden = !refused;
  ui.keyInput.value = "";
  ui.keyDialog.showModal();
  return new Promise((resolve) => {
    const submitted = (event) => {
      event.preventDefault();
      ui.keyDialog.removeEventListener("close", dismissed);
      ui.keyDialog.close();
      resolve(ui.keyInput.value.trim());
    };
    // Closed without a key (Esc): the requests that need one wait until the page reloads.
    const dismissed = () => {
      ui.keyForm.removeEventListener("submit", submitted);
      showError({ code: "unauthorized", message: "This server needs an API key: reload the page to enter it" });
    };
    ui.keyForm.addEventListener("submit", submitted, { once: true });
    ui.keyDialog.addEventListener("close", dismissed, { once: true });
  });
}

function bind() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.input.addEventListener("input", resizeInput);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && view?.activeRun && !ui.keyDialog.open) view.cancel();
  });
  ui.stop.addEventListener("click", () => {
    view.cancel();
    ui.input.focus(); // the button hides once the run ends: keep the keyboard in the composer
  });
  ui.newChat.addEventListener("click", () => {
    if (location.hash) location.hash = "";
    else route();
  });
  ui.agent.addEventListener("change", () => {
    localStorage.setItem(AGENT_STORAGE, ui.agent.value);
    describeAgent();
    // Another agent means another conversation: a session belongs to one agent.
    if (view?.agent !== ui.agent.value) ui.newChat.click();
  });
  ui.userId.value = userId();
  ui.userId.addEventListener("change", () => {
    const id = ui.userId.value.trim();
    if (!id) {
      ui.userId.value = userId();
      return;
    }
    localStorage.setItem(USER_STORAGE, id);
    loadSessions().catch(showError);
    ui.newChat.click();
  });
  ui.menu.addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    ui.menu.setAttribute("aria-expanded", String(open));
  });
  ui.sessions.addEventListener("click", (event) => {
    if (event.target.closest("a")) document.body.classList.remove("sidebar-open");
  });
  window.addEventListener("hashchange", route);
}

async function main() {
  setKeyPrompt(askForKey);
  bind();
  try {
    await loadAgents();
    await route();
    await loadSessions();
  } catch (error) {
    showError(error);
  }
  document.body.dataset.ready = "true";
}

main();
