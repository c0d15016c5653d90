// A small SVG line chart: no chart library, no canvas, text stays selectable.

import { h, s, colorOf, clock, hhmm } from "./dom.js";

const W = 560;
const H = 180;
const PAD = { l: 64, r: 10, t: 10, b: 24 };

export function lineChart(title, series, { from, to, format, id, step = false }) {
  const box = h("figure", { class: "chart", id });
  box.append(h("figcaption", { text: title }));
  const pts = series.flatMap((x) => x.pts.filter((p) => p[0] >= from));
  if (!pts.length) {
    box.append(h("p", { class: "muted empty", text: "nothing in the last hour yet" }));
    return box;
  }
  let max = Math.max(...pts.map((p) => p[1]));
  if (!(max > 0)) max = 1;
  max *= 1.1;
  const x = (t) => PAD.l + ((t - from) / Math.max(to - from, 1)) * (W - PAD.l - PAD.r);
  const y = (v) => H - PAD.b - (v / max) * (H - PAD.t - PAD.b);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img",
    "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    svg.append(s("line", { x1: PAD.l, x2: W - PAD.r, y1: y(v), y2: y(v), class: "grid" }),
      s("text", { x: PAD.l - 6, y: y(v) + 4, class: "axis", "text-anchor": "end",
        text: format(v) }));
  }
  for (let i = 0; i <= 4; i++) {
    const t = from + ((to - from) * i) / 4;
    svg.append(s("text", { x: x(t), y: H - 6, class: "axis",
      "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle", text: hhmm(t) }));
  }
  const legend = h("ul", { class: "legend" });
  for (const ser of series) {
    const p = ser.pts.filter((q) => q[0] >= from);
    if (!p.length) continue;
    const color = colorOf(ser.name.split(" ")[0]);
    let d = "";
    p.forEach(([t, v], i) => {
      if (i === 0) d += `M${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      else if (step) d += `H${x(t).toFixed(1)}V${y(v).toFixed(1)}`;
      else d += `L${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    });
    if (step) d += `H${x(to).toFixed(1)}`;
    svg.append(s("path", { d, class: "line", stroke: color }));
    for (const [t, v] of p.slice(-60)) {
      svg.append(s("circle", { cx: x(t), cy: y(v), r: 2.2, fill: color },
        s("title", { text: `${ser.name} ${format(v)} at ${clock(t)}` })));
    }
    legend.append(h("li", {}, h("span", { class: "swatch", style: { "--c": color } }),
      `${ser.name} (${format(p[p.length - 1][1])})`));
  }
  box.append(svg, legend);
  return box;
}
