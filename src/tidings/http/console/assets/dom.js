// Small helpers to build the DOM. Text always goes in as text (textContent):
// topics, user names and payloads come from clients, and must never become markup.

/**
 * h("td", {class: "num", dataset: {client: id}}, "text", child, ...): an element.
 * Attributes starting with "on" are event listeners; `text` sets textContent.
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

export function count(value) {
  return value === null || value === undefined ? "–" : integer.format(value);
}

export function rate(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return value >= 100 ? integer.format(value) : decimal.format(value);
}

/** 1536 -> "1.5 KiB". */
export function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let amount = value;
  let unit = 0;
  while (amount >= 1024 && unit < units.length - 1) {
    amount /= 1024;
    unit += 1;
  }
  return `${unit ? decimal.format(amount) : amount} ${units[unit]}`;
}

/** 93784 -> "1d 2h", 3725 -> "1h 2m", 62 -> "1m 2s". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = s % 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${mm}m`;
  if (mm) return `${mm}m ${ss}s`;
  return `${ss}s`;
}

/** An RFC 3339 time as the viewer's local time of day (with the date if not today). */
export function clock(rfc3339, { milliseconds = false } = {}) {
  const date = new Date(rfc3339);
  if (Number.isNaN(date.getTime())) return rfc3339;
  const time = date.toLocaleTimeString("en-GB", { hour12: false });
  const ms = milliseconds ? `.${String(date.getMilliseconds()).padStart(3, "0")}` : "";
  const today = new Date().toDateString() === date.toDateString();
  return today ? time + ms : `${date.toISOString().slice(0, 10)} ${time}${ms}`;
}

export function since(rfc3339) {
  const date = new Date(rfc3339);
  if (Number.isNaN(date.getTime())) return "";
  return `${duration((Date.now() - date.getTime()) / 1000)} ago`;
}

/** A link to the live tail of a topic. */
export function tailHref(topic, tenant) {
  const query = new URLSearchParams({ topic });
  if (tenant) query.set("tenant", tenant);
  return `#tail?${query}`;
}

/**
 * Replace a tbody's rows, keeping keyboard focus on the same control (by its
 * data-key) across the refresh, so that a live table can be used with the keyboard.
 */
export function replaceRows(tbody, rows) {
  const focused = document.activeElement;
  const key = tbody.contains(focused) ? focused.dataset.key : null;
  tbody.replaceChildren(...rows);
  if (key) {
    const again = tbody.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
}

/** A row saying the table is empty (or why). */
export function emptyRow(columns, text) {
  return h("tr", {}, h("td", { class: "empty", colspan: columns, text }));
}
