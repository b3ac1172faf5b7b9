// The console's only way to the node: its session endpoints and the documented HTTP API.
//
// The session cookie is HttpOnly: this code never sees it. What it holds is the
// session's CSRF token, sent as a header with every API call; the node refuses a
// call that carries the cookie without it.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function decode(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    throw new ApiError(response.status, "invalid_answer", `the node answered ${response.status} without JSON`);
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "error", error.message || `HTTP ${response.status}`);
  }
  return body;
}

export class Api {
  constructor() {
    this.session = null;
    /** Called when the node says the session is no longer valid. */
    this.onUnauthorized = () => {};
  }

  /** The current session (from the cookie), or null when logged out. */
  async loadSession() {
    const response = await fetch("session", { cache: "no-store", credentials: "same-origin" });
    const answer = await decode(response);
    this.session = answer.loggedIn ? answer : null;
    return this.session;
  }

  async login(key) {
    const response = await fetch("login", {
      method: "POST",
      cache: "no-store",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key }),
    });
    this.session = await decode(response);
    return this.session;
  }

  async logout() {
    if (!this.session) return;
    const session = this.session;
    this.session = null;
    const response = await fetch("logout", {
      method: "POST",
      cache: "no-store",
      credentials: "same-origin",
      headers: { [session.csrfHeader]: session.csrf },
    });
    await decode(response);
  }

  /** ``POST /api/<method>`` with the session's CSRF token; the decoded answer. */
  async call(method, body = {}) {
    const session = this.session;
    if (!session) throw new ApiError(401, "unauthorized", "not logged in");
    const response = await fetch(`${session.api}${method}`, {
      method: "POST",
      cache: "no-store",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", [session.csrfHeader]: session.csrf },
      body: JSON.stringify(body),
    });
    if (response.status === 401 && this.session === session) {
      this.session = null;
      this.onUnauthorized();
    }
    return decode(response);
  }
}
