// A line chart drawn as inline SVG: a few polylines over the last minutes.
// No library: the axes are three grid lines and three time labels.

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 180;
const LEFT = 48; // room for the value labels
const BOTTOM = 18; // room for the time labels

function svg(tag, attributes = {}, text = null) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  if (text !== null) element.textContent = text;
  return element;
}

/** 0, 1, 2, 5, 10, 20, 50, ...: a round maximum at or above `value`. */
function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

function label(value) {
  if (value >= 1e6) return `${(value / 1e6).toFixed(value >= 1e7 ? 0 : 1)}M`;
  if (value >= 1e3) return `${(value / 1e3).toFixed(value >= 1e4 ? 0 : 1)}k`;
  return String(Math.round(value * 10) / 10);
}

/**
 * Draw `series` ([{name, cls, points: [[t, value], ...]}], t in seconds) over the
 * `span` seconds before `now` into `container`, replacing what was there.
 */
export function drawChart(container, series, { span = 360, now = Date.now() / 1000, summary = "" } = {}) {
  const width = Math.max(container.clientWidth || 0, 280);
  const plotWidth = width - LEFT;
  const plotHeight = HEIGHT - BOTTOM;
  const start = now - span;
  const visible = series.map((line) => ({ ...line, points: line.points.filter(([t]) => t >= start) }));
  const peak = Math.max(0, ...visible.flatMap((line) => line.points.map(([, v]) => v)));
  const top = niceMax(peak);
  const x = (t) => LEFT + ((t - start) / span) * plotWidth;
  const y = (v) => plotHeight - (v / top) * (plotHeight - 6);

  const root = svg("svg", {
    viewBox: `0 0 ${width} ${HEIGHT}`,
    width,
    height: HEIGHT,
    role: "img",
    "aria-label": summary || "chart",
  });
  root.append(svg("title", {}, summary || "chart"));
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    root.append(svg("line", { class: "grid", x1: LEFT, x2: width, y1: y(value), y2: y(value) }));
    root.append(svg("text", { class: "axis", x: LEFT - 6, y: y(value) + 4, "text-anchor": "end" }, label(value)));
  }
  const minutes = Math.round(span / 60);
  const ticks = [
    [start, `-${minutes}m`, "start"],
    [start + span / 2, `-${minutes / 2}m`, "middle"],
    [now, "now", "end"],
  ];
  for (const [t, text, anchor] of ticks) {
    root.append(svg("text", { class: "axis", x: x(t), y: HEIGHT - 2, "text-anchor": anchor }, text));
  }
  let drawn = 0;
  for (const line of visible) {
    if (line.points.length < 2) continue;
    const points = line.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { class: `line ${line.cls}`, points, "data-series": line.name }));
    drawn += 1;
  }
  if (!drawn) {
    root.append(
      svg("text", { class: "empty", x: LEFT + plotWidth / 2, y: plotHeight / 2, "text-anchor": "middle" },
        "collecting samples (one every few seconds)"),
    );
  }
  container.replaceChildren(root);
}
