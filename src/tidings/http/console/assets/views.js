// The console's views. Each has refresh() (one round of API calls, at most once
// per `interval` ms while it is shown) and show(params) when the route selects it.

import { drawChart } from "./chart.js";
import { $, bytes, clock, count, duration, emptyRow, h, rate, replaceRows, since, tailHref } from "./dom.js";
import { PagedTable } from "./table.js";

const WINDOW_S = 360; // the chart's span: six minutes, what the node keeps

// --- overview ----------------------------------------------------------------------

export class Overview {
  constructor(api) {
    this.api = api;
    this.interval = 2000;
    this.samples = new Map(); // node -> [sample, ...], oldest first
    this.lastSample = 0;
  }

  async refresh() {
    const [info, series] = await Promise.all([
      this.api.call("info"),
      this.api.call("series", { since: this.lastSample }),
    ]);
    const horizon = Date.now() / 1000 - WINDOW_S;
    for (const { node, samples } of series.nodes) {
      const kept = (this.samples.get(node) || []).concat(samples).filter((s) => s.t >= horizon);
      this.samples.set(node, kept);
      for (const sample of samples) this.lastSample = Math.max(this.lastSample, sample.t);
    }
    const sums = new Map(); // t -> {delivered, dropped}: the nodes' samples line up in time
    for (const samples of this.samples.values()) {
      for (const { t, delivered, dropped } of samples) {
        const sum = sums.get(t) || { delivered: 0, dropped: 0 };
        sum.delivered += delivered;
        sum.dropped += dropped;
        sums.set(t, sum);
      }
    }
    const times = [...sums.keys()].sort((a, b) => a - b);
    const latest = times.length ? sums.get(times[times.length - 1]) : null;
    this.renderStats(info, latest);
    drawChart($("#overview-chart"), [
      { name: "delivered", cls: "delivered", points: times.map((t) => [t, sums.get(t).delivered]) },
      { name: "dropped", cls: "dropped", points: times.map((t) => [t, sums.get(t).dropped]) },
    ], {
      span: WINDOW_S,
      summary: latest
        ? `Deliveries per second: ${rate(latest.delivered)} now; drops per second: ${rate(latest.dropped)} now.`
        : "No samples yet.",
    });
    this.renderNodes(info);
  }

  renderStats(info, latest) {
    const totals = info.cluster || info;
    const nodes = info.nodes ? info.nodes.length : 1;
    const topics = info.nodes ? Math.max(...info.nodes.map((node) => node.topics || 0)) : info.topics;
    const items = [
      ["nodes", "Nodes", count(nodes)],
      ["uptime", "Uptime (this node)", duration(info.uptime)],
      ["connections", "Connections", count(totals.connections)],
      ["subscriptions", "Subscriptions", count(totals.subscriptions)],
      ["topics", info.nodes ? "Topics (largest node)" : "Topics", count(topics)],
      ["delivered-rate", "Deliveries/s", latest ? rate(latest.delivered) : "–"],
      ["dropped-rate", "Drops/s", latest ? rate(latest.dropped) : "–"],
      ["dropped", "Dropped in all", count(totals.dropped)],
    ];
    $("#overview-stats").replaceChildren(
      ...items.map(([key, label, value]) => h("div", { dataset: { stat: key } }, h("dt", { text: label }), h("dd", { text: value }))),
    );
  }

  renderNodes(info) {
    const nodes = info.nodes || [{ node: info.node, ...info }];
    const rows = nodes.map((node) => h("tr", { dataset: { node: node.node } },
      h("td", {}, node.node, node.node === info.node ? h("span", { class: "muted", text: " (this node)" }) : null),
      h("td", { class: "num", text: duration(node.uptime) }),
      h("td", { class: "num", text: count(node.connections) }),
      h("td", { class: "num", text: count(node.subscriptions) }),
      h("td", { class: "num", text: count(node.topics) }),
      h("td", { class: "num", text: count(node.published) }),
      h("td", { class: "num", text: count(node.delivered) }),
      h("td", { class: node.dropped ? "num warn" : "num", text: count(node.dropped) }),
    ));
    replaceRows($("#nodes-table").tBodies[0], rows);
    const backplane = info.backplane;
    $("#overview-backplane").textContent = backplane
      ? `Backplane: ${backplane.kind} ${backplane.url}, ${backplane.connected ? "connected" : "NOT connected"}.`
      : "Backplane: memory (this node alone).";
  }
}

// --- clients -----------------------------------------------------------------------

export class Clients {
  constructor(api, { onDisconnect }) {
    this.api = api;
    this.interval = 2000;
    this.table = new PagedTable({
      api,
      method: "clients",
      prefix: "clients",
      sort: "connectedAt",
      order: "desc",
      noun: "clients",
      columns: 12,
      row: (client) => this.row(client),
    });
    this.onDisconnect = onDisconnect;
  }

  set refreshNow(fn) {
    this.table.refreshNow = fn;
  }

  show(params) {
    const filter = params.get("filter");
    if (filter !== null) {
      $("#clients-filter").value = filter;
      this.table.filter = filter.trim();
      this.table.offset = 0;
    }
  }

  refresh() {
    return this.table.refresh();
  }

  row(client) {
    const topics = client.topics.map((topic) => h("a", {
      href: tailHref(topic, client.tenant),
      class: "topic",
      dataset: { key: `topic:${client.client}:${topic}` },
      text: topic,
    }));
    const more = client.subscriptions - client.topics.length;
    return h("tr", { dataset: { client: client.client } },
      h("td", { class: "mono", text: client.client }),
      h("td", { text: client.user ?? "–" }),
      h("td", { text: client.tenant }),
      h("td", { class: "col-node", text: client.node }),
      h("td", { class: "mono", text: client.remote }),
      h("td", { text: `${client.dialect} ${client.path}` }),
      h("td", { class: "topics-cell" },
        h("span", { class: "muted", text: `${count(client.subscriptions)}: ` }),
        topics,
        more > 0 ? h("span", { class: "muted", text: `+${count(more)} more` }) : null),
      h("td", { class: "num", title: `${bytes(client.queuedBytes)} queued` },
        count(client.queued),
        client.queuedBytes ? h("span", { class: "muted", text: ` (${bytes(client.queuedBytes)})` }) : null),
      h("td", { class: "num", text: count(client.peakQueued) }),
      h("td", { class: client.dropped ? "num warn" : "num", text: count(client.dropped) }),
      h("td", {}, h("time", { datetime: client.connectedAt, title: since(client.connectedAt), text: clock(client.connectedAt) })),
      h("td", {}, h("button", {
        type: "button",
        class: "small danger",
        "aria-label": `Disconnect client ${client.client}`,
        dataset: { key: `disconnect:${client.client}`, action: "disconnect" },
        onclick: () => this.onDisconnect(client),
        text: "Disconnect",
      })),
    );
  }
}

// --- topics ------------------------------------------------------------------------

export class Topics {
  constructor(api) {
    this.api = api;
    this.interval = 2000;
    this.previous = new Map(); // node/tenant/topic -> {published, at}: for publications/s
    this.table = new PagedTable({
      api,
      method: "topics",
      prefix: "topics",
      sort: "topic",
      order: "asc",
      noun: "topics",
      columns: 11,
      row: (topic) => this.row(topic),
    });
  }

  set refreshNow(fn) {
    this.table.refreshNow = fn;
  }

  async refresh() {
    this.now = Date.now() / 1000;
    await this.table.refresh();
  }

  row(topic) {
    const key = `${topic.node}\u0000${topic.tenant}\u0000${topic.topic}`;
    const before = this.previous.get(key);
    let perSecond = null;
    if (before && this.now > before.at) perSecond = Math.max(0, topic.published - before.published) / (this.now - before.at);
    this.previous.set(key, { published: topic.published, at: this.now });
    return h("tr", { dataset: { topic: topic.topic, tenant: topic.tenant } },
      h("td", {}, h("a", { href: tailHref(topic.topic, topic.tenant), dataset: { key: `tail:${key}` }, text: topic.topic })),
      h("td", { text: topic.tenant }),
      h("td", { class: "col-node", text: topic.node }),
      h("td", { class: "num", text: count(topic.subscribers) }),
      h("td", { class: "num", text: count(topic.seq) }),
      h("td", { class: "mono", text: topic.epoch }),
      h("td", { class: "num", text: count(topic.history) }),
      h("td", { class: "num", text: topic.historyAge === null ? "–" : duration(topic.historyAge) }),
      h("td", { class: "num", text: rate(perSecond) }),
      h("td", { class: "num", text: count(topic.delivered) }),
      h("td", { class: topic.dropped ? "num warn" : "num", text: count(topic.dropped) }),
    );
  }
}

// --- live tail and presence ------------------------------------------------------------

const TAIL_BACKLOG = 20; // events shown when a tail starts
const TAIL_BATCH = 100; // events read per poll
const TAIL_KEEP = 200; // events kept on the page
const TAIL_SKIP = 1000; // further behind than this, the tail jumps ahead (and says so)
const PRESENCE_LISTED = 200; // subscribers listed by name at most

export class Tail {
  constructor(api, { navigate }) {
    this.api = api;
    this.interval = 1000;
    this.topic = null;
    this.tenant = null;
    this.ticks = 0;
    $("#tail-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const topic = $("#tail-topic").value.trim();
      if (!topic) {
        $("#tail-topic").setAttribute("aria-invalid", "true");
        $("#tail-status").textContent = "Enter a topic to watch.";
        $("#tail-topic").focus();
        return;
      }
      $("#tail-topic").removeAttribute("aria-invalid");
      navigate(tailHref(topic, $("#tail-tenant").value.trim()));
    });
  }

  show(params) {
    const topic = params.get("topic");
    const tenant = params.get("tenant") || null;
    if (topic === this.topic && tenant === this.tenant) return;
    this.topic = topic;
    this.tenant = tenant;
    this.epoch = null;
    this.since = null;
    this.ticks = 0;
    $("#tail-topic").value = topic || "";
    $("#tail-tenant").value = tenant || "";
    $("#tail-events").replaceChildren();
    $("#presence-list").replaceChildren();
    $("#tail-events-title").textContent = topic ? `Events of ${topic}` : "Events";
    $("#tail-status").textContent = topic ? "Starting…" : "Choose a topic to follow its events as they are published.";
    $("#presence-status").textContent = topic ? "" : "Who is subscribed to the topic, on every node.";
  }

  body(extra) {
    const body = { topic: this.topic, ...extra };
    if (this.tenant) body.tenant = this.tenant;
    return body;
  }

  async refresh() {
    if (!this.topic) return;
    const topic = this.topic;
    const primed = this.since !== null;
    if (!primed) {
      const head = await this.api.call("history", this.body({ limit: 1 }));
      if (topic !== this.topic) return;
      this.epoch = head.epoch;
      this.since = Math.max(0, head.seq - TAIL_BACKLOG);
    }
    let answer = await this.api.call("history", this.body({ since: this.since, limit: TAIL_BATCH }));
    if (topic !== this.topic) return;
    if (answer.epoch && this.epoch && answer.epoch !== this.epoch) {
      this.marker(`New epoch ${answer.epoch}: the topic's offsets restarted.`);
      this.epoch = answer.epoch;
      this.since = 0;
      answer = await this.api.call("history", this.body({ since: 0, limit: TAIL_BATCH }));
    }
    this.epoch = answer.epoch || this.epoch;
    if (answer.seq - this.since > TAIL_SKIP) {
      this.marker(`Skipped ${count(answer.seq - TAIL_BACKLOG - this.since)} events to keep up.`);
      this.since = answer.seq - TAIL_BACKLOG;
      answer = await this.api.call("history", this.body({ since: this.since, limit: TAIL_BATCH }));
    }
    for (const event of answer.events) {
      if (primed && event.seq > this.since + 1) {
        this.marker(`Events ${this.since + 1} to ${event.seq - 1} are no longer in history.`);
      }
      this.add(event);
      this.since = event.seq;
    }
    let status = "No events on this topic yet.";
    if (!answer.events.length && answer.seq > this.since) {
      // The topic moved on but history returned nothing: it keeps none (history_size 0).
      status = `At seq ${count(answer.seq)}, epoch ${answer.epoch}; its history keeps no events to show.`;
    } else if (answer.seq > 0) {
      status = `At seq ${count(answer.seq)}, epoch ${answer.epoch}. New events appear at the top.`;
    }
    $("#tail-status").textContent = status;
    if (this.ticks++ % 2 === 0) await this.refreshPresence(topic);
  }

  async refreshPresence(topic) {
    // The count first: a topic with thousands of subscribers is not listed every
    // two seconds (the Clients view, filtered by the topic, pages through them).
    const stats = await this.api.call("presence_stats", this.body());
    if (topic !== this.topic) return;
    if (stats.clients > PRESENCE_LISTED) {
      $("#presence-list").replaceChildren();
      $("#presence-status").replaceChildren(
        `${count(stats.clients)} connected (${count(stats.users)} users): too many to list here; `,
        h("a", { href: `#clients?${new URLSearchParams({ filter: topic })}`, text: "see them in Clients" }),
        ".",
      );
      return;
    }
    const presence = await this.api.call("presence", this.body());
    if (topic === this.topic) this.renderPresence(presence);
  }

  add(event) {
    const list = $("#tail-events");
    list.prepend(h("li", { dataset: { seq: event.seq } },
      h("span", { class: "seq", text: `#${event.seq}` }),
      h("time", { datetime: event.timestamp, text: clock(event.timestamp, { milliseconds: true }) }),
      h("code", { class: "payload", text: JSON.stringify(event.payload).slice(0, 2000) }),
    ));
    while (list.children.length > TAIL_KEEP) list.lastElementChild.remove();
  }

  marker(text) {
    $("#tail-events").prepend(h("li", { class: "marker", text }));
  }

  renderPresence(answer) {
    const items = answer.clients.map((client) => h("li", { dataset: { client: client.client } },
      h("code", { text: client.client }), " ",
      client.user ?? "(anonymous)", " ",
      h("span", { class: "muted", text: `${client.tenant}, since ${clock(client.connectedAt)}` }),
    ));
    $("#presence-list").replaceChildren(...items);
    $("#presence-status").textContent = `${count(answer.clients.length)} connected.`;
  }
}

// --- publish -----------------------------------------------------------------------

export class Publish {
  constructor(api) {
    this.api = api;
    this.interval = null; // nothing to refresh
    const payload = $("#publish-payload");
    payload.addEventListener("input", () => this.validPayload(false));
    $("#publish-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  show(params) {
    if (params.get("topic")) $("#publish-topic").value = params.get("topic");
    if (params.get("tenant")) $("#publish-tenant").value = params.get("tenant");
  }

  /** The payload parsed, or undefined (and the field marked) when it is not JSON. */
  validPayload(focus) {
    const field = $("#publish-payload");
    const error = $("#publish-payload-error");
    try {
      const value = JSON.parse(field.value);
      field.removeAttribute("aria-invalid");
      error.textContent = "";
      return { value };
    } catch (problem) {
      field.setAttribute("aria-invalid", "true");
      error.textContent = `Not valid JSON: ${problem.message}`;
      if (focus) field.focus();
      return undefined;
    }
  }

  async submit() {
    const result = $("#publish-result");
    result.textContent = "";
    result.className = "";
    const topicField = $("#publish-topic");
    const topic = topicField.value.trim();
    const topicError = $("#publish-topic-error");
    if (!topic) {
      topicField.setAttribute("aria-invalid", "true");
      topicError.textContent = "A topic is required.";
      topicField.focus();
      return;
    }
    topicField.removeAttribute("aria-invalid");
    topicError.textContent = "";
    const payload = this.validPayload(true);
    if (!payload) return;
    const body = { topic, payload: payload.value };
    const tenant = $("#publish-tenant").value.trim();
    if (tenant) body.tenant = tenant;
    const button = $("#publish-submit");
    button.disabled = true;
    try {
      const answer = await this.api.call("publish", body);
      result.className = "ok";
      result.replaceChildren(
        `Published to ${answer.topic}: seq ${answer.seq}, epoch ${answer.epoch}. `,
        h("a", { href: tailHref(answer.topic, tenant), text: "Watch it" }),
      );
      result.dataset.seq = answer.seq;
    } catch (problem) {
      result.className = "error";
      result.textContent = `Not published: ${problem.message}${problem.code ? ` (${problem.code})` : ""}`;
    } finally {
      button.disabled = false;
    }
  }
}
