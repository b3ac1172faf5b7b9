// The tidings console: login, routing between views, and the refresh loop.
//
// One view is shown at a time and only it is refreshed, once per its interval
// (1 to 2 s), never two rounds at once, and not while the tab is hidden: a viewer
// costs the node a few small API calls per second at most.

import { Api, ApiError } from "./api.js";
import { $, clock } from "./dom.js";
import { Clients, Overview, Publish, Tail, Topics } from "./views.js";

const api = new Api();
const app = {
  view: null,
  views: {},
  timer: null,
  busy: false,
  again: false,
};

// --- showing things ----------------------------------------------------------------

function showOnly(id) {
  for (const section of document.querySelectorAll("main > .view")) section.hidden = section.id !== id;
}

function setError(text) {
  $("#status-error").textContent = text || "";
}

function showLogin(message = "") {
  stopRefreshing();
  app.view = null;
  $("#nav").hidden = true;
  $("#session-bar").hidden = true;
  $("#login-error").textContent = message;
  document.body.dataset.state = "logged-out";
  showOnly("view-login");
  $("#login-key").focus();
}

function showApp(session) {
  $("#nav").hidden = false;
  $("#session-bar").hidden = false;
  $("#node-label").textContent = `node ${session.node} · tidings ${session.version}`;
  document.body.dataset.state = "logged-in";
  // Alone, a node need not say on every row that the row is its own.
  document.body.dataset.clustered = String(Boolean(session.clustered));
  route({ focus: false });
}

// --- routing: #view or #view?param=value ------------------------------------------------

function parseHash() {
  const hash = location.hash.slice(1);
  const [name, query = ""] = hash.split("?", 2);
  return { name: app.views[name] ? name : "overview", params: new URLSearchParams(query) };
}

function route({ focus = true } = {}) {
  if (!api.session) return;
  const { name, params } = parseHash();
  const changed = app.view !== name;
  app.view = name;
  showOnly(`view-${name}`);
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${$(`#${name}-title`).textContent} · tidings console`;
  const view = app.views[name];
  if (view.show) view.show(params);
  // Keyboard and screen-reader users land on the new view's heading.
  if (changed && focus) $(`#${name}-title`).focus();
  refreshNow();
}

function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash; // hashchange routes
}

// --- refreshing ----------------------------------------------------------------------

function stopRefreshing() {
  clearTimeout(app.timer);
  app.timer = null;
}

function schedule() {
  stopRefreshing();
  const view = app.views[app.view];
  if (view && view.interval) app.timer = setTimeout(tick, view.interval);
}

async function tick() {
  if (!api.session || !app.view) return;
  if (app.busy) {
    app.again = true; // one more round when the current one ends
    return;
  }
  if (document.hidden || $("#disconnect-dialog").open) {
    schedule();
    return;
  }
  const view = app.views[app.view];
  if (!view.refresh) return; // a form: nothing to keep up to date
  app.busy = true;
  try {
    await view.refresh();
    if (api.session) {
      $("#status-updated").textContent = `Updated ${clock(new Date().toISOString())}`;
      setError("");
    }
  } catch (problem) {
    if (problem instanceof ApiError && problem.status === 401) return; // the login shows
    if (problem instanceof ApiError) setError(`${problem.message} (${problem.code})`);
    else if (problem instanceof TypeError && /fetch/i.test(problem.message)) setError("Cannot reach the node.");
    else {
      setError(`The console failed: ${problem.message}`);
      console.error(problem); // for whoever opens the developer tools (and the tests)
    }
  } finally {
    app.busy = false;
    if (api.session) {
      if (app.again) {
        app.again = false;
        tick();
      } else schedule();
    }
  }
}

function refreshNow() {
  stopRefreshing();
  tick();
}

// --- disconnecting -----------------------------------------------------------------------

function askDisconnect(client) {
  const dialog = $("#disconnect-dialog");
  dialog.dataset.client = client.client;
  dialog.dataset.tenant = client.tenant;
  $("#disconnect-client").textContent = `${client.client} (${client.user ?? "anonymous"}, ${client.tenant}, ${client.remote})`;
  dialog.returnFocus = document.activeElement;
  dialog.showModal();
  $("#disconnect-cancel").focus();
}

function closeDisconnect() {
  const dialog = $("#disconnect-dialog");
  dialog.close();
  if (dialog.returnFocus && dialog.returnFocus.isConnected) dialog.returnFocus.focus();
}

async function confirmDisconnect(event) {
  event.preventDefault();
  const dialog = $("#disconnect-dialog");
  const body = {
    client: dialog.dataset.client,
    tenant: dialog.dataset.tenant,
    reason: $("#disconnect-reason").value.slice(0, 100),
  };
  try {
    const answer = await api.call("disconnect", body);
    setError(answer.disconnected ? "" : `Client ${body.client} was already gone.`);
  } catch (problem) {
    setError(`Not disconnected: ${problem.message}`);
  }
  closeDisconnect();
  refreshNow();
}

// --- start ---------------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const field = $("#login-key");
  const button = $("#login-submit");
  if (!field.value) {
    $("#login-error").textContent = "Enter the API key.";
    field.setAttribute("aria-invalid", "true");
    field.focus();
    return;
  }
  button.disabled = true;
  try {
    const session = await api.login(field.value);
    field.value = "";
    field.removeAttribute("aria-invalid");
    $("#login-error").textContent = "";
    showApp(session);
    $("#main").focus();
  } catch (problem) {
    field.setAttribute("aria-invalid", "true");
    $("#login-error").textContent =
      problem instanceof ApiError && problem.status === 401 ? "Wrong API key." : `Cannot log in: ${problem.message}`;
    field.select();
  } finally {
    button.disabled = false;
  }
}

async function logout() {
  stopRefreshing();
  try {
    await api.logout();
  } catch (problem) {
    setError(`Logging out failed: ${problem.message}`);
  }
  showLogin("Logged out.");
}

async function start() {
  app.views = {
    overview: new Overview(api),
    clients: new Clients(api, { onDisconnect: askDisconnect }),
    topics: new Topics(api),
    tail: new Tail(api, { navigate }),
    publish: new Publish(api),
  };
  app.views.clients.refreshNow = refreshNow;
  app.views.topics.refreshNow = refreshNow;
  api.onUnauthorized = () => showLogin("Your session has ended: log in again.");

  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#disconnect-form").addEventListener("submit", confirmDisconnect);
  $("#disconnect-cancel").addEventListener("click", closeDisconnect);
  $("#disconnect-dialog").addEventListener("cancel", (event) => {
    event.preventDefault(); // Escape: close and give focus back, like Cancel
    closeDisconnect();
  });
  window.addEventListener("hashchange", () => route());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshNow();
  });

  try {
    const session = await api.loadSession();
    if (session) showApp(session);
    else showLogin();
  } catch (problem) {
    showLogin(`Cannot reach the node: ${problem.message}`);
  }
}

start();
