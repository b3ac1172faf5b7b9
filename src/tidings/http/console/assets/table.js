// A live table of one of the API's paged lists (clients, topics): the node sorts,
// filters and cuts the page, so thousands of rows cost the page only what it shows.

import { $, count, emptyRow, h, replaceRows } from "./dom.js";

const FILTER_DELAY_MS = 300;

export class PagedTable {
  /**
   * @param {object} options
   *   api, method ("clients" | "topics"), prefix (element ids), sort, order,
   *   row(entry) -> <tr>, columns (for the empty row), noun ("clients")
   */
  constructor(options) {
    Object.assign(this, options);
    this.offset = 0;
    this.limit = Number($(`#${this.prefix}-size`).value);
    this.filter = "";
    this.total = 0;
    this.table = $(`#${this.prefix}-table`);
    this.tbody = this.table.tBodies[0];
    this.range = $(`#${this.prefix}-range`);
    this.previous = $(`#${this.prefix}-prev`);
    this.next = $(`#${this.prefix}-next`);
    this.refreshNow = () => {};

    // Sortable headers become buttons: reachable with Tab, announced with aria-sort.
    for (const th of this.table.querySelectorAll("th[data-sort]")) {
      const label = th.textContent;
      const button = h("button", { type: "button", class: "sort", text: label });
      button.addEventListener("click", () => this.sortBy(th.dataset.sort));
      th.replaceChildren(button);
    }
    this.markSorted();
    // On a narrow screen each row becomes a card, each cell labelled by its column.
    this.labels = [...this.table.tHead.rows[0].cells].map((th) => th.textContent.trim());

    let pending = null;
    $(`#${this.prefix}-filter`).addEventListener("input", (event) => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        this.filter = event.target.value.trim();
        this.offset = 0;
        this.refreshNow();
      }, FILTER_DELAY_MS);
    });
    $(`#${this.prefix}-size`).addEventListener("change", (event) => {
      this.limit = Number(event.target.value);
      this.offset = 0;
      this.refreshNow();
    });
    this.previous.addEventListener("click", () => {
      this.offset = Math.max(0, this.offset - this.limit);
      this.refreshNow();
    });
    this.next.addEventListener("click", () => {
      this.offset += this.limit;
      this.refreshNow();
    });
  }

  sortBy(field) {
    if (this.sort === field) this.order = this.order === "asc" ? "desc" : "asc";
    else {
      this.sort = field;
      this.order = "asc";
    }
    this.offset = 0;
    this.markSorted();
    this.refreshNow();
  }

  markSorted() {
    for (const th of this.table.querySelectorAll("th[data-sort]")) {
      if (th.dataset.sort === this.sort) th.setAttribute("aria-sort", this.order === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  async refresh() {
    const body = { sort: this.sort, order: this.order, offset: this.offset, limit: this.limit };
    if (this.filter) body.filter = this.filter;
    const answer = await this.api.call(this.method, body);
    const entries = answer[this.method];
    this.total = answer.total;
    if (!entries.length && this.offset > 0 && this.total > 0) {
      // The list shrank under us: show its last page instead of an empty one.
      this.offset = Math.max(0, Math.floor((this.total - 1) / this.limit) * this.limit);
      return this.refresh();
    }
    const rows = entries.map((entry) => {
      const row = this.row(entry);
      [...row.cells].forEach((cell, index) => {
        if (this.labels[index]) cell.dataset.label = this.labels[index];
      });
      return row;
    });
    const empty = this.filter ? `No ${this.noun} match “${this.filter}”.` : `No ${this.noun}.`;
    replaceRows(this.tbody, rows.length ? rows : [emptyRow(this.columns, empty)]);
    const first = entries.length ? this.offset + 1 : 0;
    const last = this.offset + entries.length;
    let text = `${count(first)}–${count(last)} of ${count(this.total)} ${this.noun}`;
    if (answer.missing && answer.missing.length) text += ` (not answering: ${answer.missing.join(", ")})`;
    this.range.textContent = text;
    this.previous.disabled = this.offset === 0;
    this.next.disabled = last >= this.total;
    return answer;
  }
}
