// The HTTP API as the page uses it: JSON in and out, errors as ApiError, and the API key.
// The key is asked for on the first 401, kept in this tab's sessionStorage (gone when the tab
// closes) and sent as X-API-Key; a server without a key never asks.

const KEY_STORAGE = "threadline.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let askForKey = null;
let asking = null; // one prompt at a time, however many requests got 401

/** `ask(refused)` resolves with a key; `refused` tells whether a stored key was just refused. */
export function setKeyPrompt(ask) {
  askForKey = ask;
}

/** A fetch() that adds the key, retries after a 401 once the user gave one, throws ApiError. */
export async function request(path, { method = "GET", body, accept = "application/json", signal } = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = { Accept: accept };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (key) headers["X-API-Key"] = key;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (response.status === 401 && askForKey) {
      // A 401 comes before anything is stored, so sending again is safe.
      asking ??= askForKey(Boolean(key)).finally(() => (asking = null));
      sessionStorage.setItem(KEY_STORAGE, await asking);
      continue;
    }
    if (!response.ok) throw await apiError(response);
    return response;
  }
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

async function apiError(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || code;
  try {
    const body = await response.json();
    code = body.error?.code ?? code;
    message = body.error?.message ?? message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}
