// Saving a view for a paper: SVG (vector, canvases embedded as images), PNG (2x raster of the same
// SVG) and CSV (the rows behind the view). All in the browser; nothing is sent anywhere.
//
// A view mixes SVG charts, canvases and plain HTML (captions, colour-scale bars, the partial-pruning
// bars). The HTML parts are drawn as SVG too: every filled or bordered box becomes a rect (a
// left-to-right CSS gradient becomes an SVG gradient) and every line of text a <text>, at its
// on-screen position, so an export shows what the screen shows.

export type Rows = Record<string, string | number | boolean | null>[];

const SVG_NS = "http://www.w3.org/2000/svg";
const SKIP_TEXT = new Set(["SCRIPT", "STYLE", "SELECT", "OPTION", "INPUT", "TEXTAREA"]);

/** A CSS colour as SVG paint: `[colour, opacity]`, or null when fully transparent. */
function paint(css: string): [string, number] | null {
  const m = css.match(/rgba?\(([^)]*)\)/);
  if (!m) return css && css !== "transparent" && css !== "none" ? [css, 1] : null;
  const [r, g, b, a = "1"] = m[1].split(/[\s,/]+/).filter(Boolean);
  const alpha = Number(a);
  return alpha > 0 ? [`rgb(${r},${g},${b})`, alpha] : null;
}

function visible(e: Element): boolean {
  const st = getComputedStyle(e);
  return st.display !== "none" && st.visibility !== "hidden" && Number(st.opacity) > 0;
}

/** The HTML boxes and text lines inside `el` (not inside its svgs and canvases) as SVG elements,
 * positioned relative to `box`. `defs` receives the gradients. */
function htmlAsSvg(el: HTMLElement, box: DOMRect, defs: SVGDefsElement): { boxes: Element[]; texts: Element[] } {
  const boxes: Element[] = [];
  const texts: Element[] = [];
  let gradients = defs.childElementCount;
  const inside = (r: DOMRect) => r.width > 0 && r.height > 0 && r.right > box.left && r.left < box.right && r.bottom > box.top && r.top < box.bottom;
  const elements = [el, ...Array.from(el.querySelectorAll("*"))].filter(
    (e) => e instanceof HTMLElement && !e.closest("svg") && !(e instanceof HTMLCanvasElement) && !(e instanceof HTMLImageElement),
  ) as HTMLElement[];
  for (const e of elements) {
    if (e === el || !visible(e)) continue;
    const r = e.getBoundingClientRect();
    if (!inside(r)) continue;
    const st = getComputedStyle(e);
    const fill = paint(st.backgroundColor);
    const gradient = st.backgroundImage.startsWith("linear-gradient") ? st.backgroundImage.match(/rgba?\([^)]*\)/g) : null;
    const borderWidth = parseFloat(st.borderTopWidth) || 0;
    const stroke = borderWidth > 0 && st.borderTopStyle !== "none" ? paint(st.borderTopColor) : null;
    if (!fill && !gradient && !stroke) continue;
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("x", String(r.left - box.left));
    rect.setAttribute("y", String(r.top - box.top));
    rect.setAttribute("width", String(r.width));
    rect.setAttribute("height", String(r.height));
    if (gradient && gradient.length > 1) {
      const id = `vitscope-gradient-${gradients++}`;
      const lg = document.createElementNS(SVG_NS, "linearGradient");
      lg.setAttribute("id", id);
      gradient.forEach((c, i) => {
        const stop = document.createElementNS(SVG_NS, "stop");
        stop.setAttribute("offset", String(i / (gradient.length - 1)));
        stop.setAttribute("stop-color", paint(c)?.[0] ?? c);
        lg.appendChild(stop);
      });
      defs.appendChild(lg);
      rect.setAttribute("fill", `url(#${id})`);
    } else if (fill) {
      rect.setAttribute("fill", fill[0]);
      if (fill[1] < 1) rect.setAttribute("fill-opacity", String(fill[1]));
    } else rect.setAttribute("fill", "none");
    if (stroke) {
      rect.setAttribute("stroke", stroke[0]);
      rect.setAttribute("stroke-width", String(borderWidth));
    }
    boxes.push(rect);
  }
  // Text: one <text> per rendered line of each text node (words grouped by their line box).
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  for (let node = walker.nextNode() as Text | null; node; node = walker.nextNode() as Text | null) {
    const parent = node.parentElement;
    if (!parent || parent.closest("svg") || SKIP_TEXT.has(parent.tagName) || parent.closest("select") || !node.data.trim()) continue;
    if (!visible(parent)) continue;
    const st = getComputedStyle(parent);
    const colour = paint(st.color) ?? ["#000", 1];
    const lines: { top: number; left: number; bottom: number; words: string[] }[] = [];
    for (const w of node.data.matchAll(/\S+/g)) {
      range.setStart(node, w.index!);
      range.setEnd(node, w.index! + w[0].length);
      const r = range.getBoundingClientRect();
      if (!inside(r)) continue;
      const line = lines.find((l) => Math.abs(l.top - r.top) < r.height / 2);
      if (line) line.words.push(w[0]);
      else lines.push({ top: r.top, left: r.left, bottom: r.bottom, words: [w[0]] });
    }
    for (const l of lines) {
      const t = document.createElementNS(SVG_NS, "text");
      const size = parseFloat(st.fontSize) || 10;
      t.setAttribute("x", String(l.left - box.left));
      t.setAttribute("y", String(l.bottom - box.top - 0.25 * size));
      t.setAttribute("font-size", String(size));
      if (st.fontWeight && Number(st.fontWeight) >= 600) t.setAttribute("font-weight", "bold");
      if (st.fontStyle === "italic") t.setAttribute("font-style", "italic");
      t.setAttribute("fill", colour[0]);
      t.textContent = l.words.join(" ");
      texts.push(t);
    }
  }
  return { boxes, texts };
}

function download(blob: Blob, filename: string): void {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  document.body.appendChild(a);
  a.click();
  a.remove();
  // Revoke late: a busy browser may start reading a large blob seconds after the click.
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
}

/** One standalone SVG document for an element: an <svg> as is; a <canvas> or a container of svgs and
 * canvases laid out at their on-screen positions. */
export function toSvg(el: HTMLElement | SVGElement): { text: string; width: number; height: number } {
  const box = el.getBoundingClientRect();
  const width = Math.max(1, Math.round(box.width));
  const height = Math.max(1, Math.round(box.height));
  const ns = "http://www.w3.org/2000/svg";
  const root = document.createElementNS(ns, "svg");
  root.setAttribute("xmlns", ns);
  root.setAttribute("width", String(width));
  root.setAttribute("height", String(height));
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("font-family", "system-ui, sans-serif");
  const bg = document.createElementNS(ns, "rect");
  bg.setAttribute("width", "100%");
  bg.setAttribute("height", "100%");
  bg.setAttribute("fill", "#ffffff");
  root.appendChild(bg);
  const single = el instanceof SVGSVGElement || el instanceof HTMLCanvasElement || el instanceof HTMLImageElement;
  const parts: Element[] = single ? [el] : Array.from(el.querySelectorAll("svg, canvas, img")).filter((e) => !e.parentElement?.closest("svg"));
  let texts: Element[] = [];
  if (!single) {
    const defs = document.createElementNS(ns, "defs") as SVGDefsElement;
    root.insertBefore(defs, bg);
    const html = htmlAsSvg(el as HTMLElement, box, defs);
    html.boxes.forEach((b) => root.appendChild(b));
    texts = html.texts;
  }
  for (const part of parts) {
    const r = part.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const x = r.left - box.left;
    const y = r.top - box.top;
    if (part instanceof SVGSVGElement) {
      const copy = part.cloneNode(true) as SVGSVGElement;
      copy.setAttribute("x", String(x));
      copy.setAttribute("y", String(y));
      copy.setAttribute("width", String(r.width));
      copy.setAttribute("height", String(r.height));
      root.appendChild(copy);
    } else {
      let href = "";
      try {
        if (part instanceof HTMLCanvasElement) href = part.toDataURL("image/png");
        else {
          const img = part as HTMLImageElement;
          const c = document.createElement("canvas");
          c.width = img.naturalWidth || Math.round(r.width);
          c.height = img.naturalHeight || Math.round(r.height);
          c.getContext("2d")!.drawImage(img, 0, 0);
          href = c.toDataURL("image/png");
        }
      } catch {
        continue;
      }
      const image = document.createElementNS(ns, "image");
      image.setAttribute("x", String(x));
      image.setAttribute("y", String(y));
      image.setAttribute("width", String(r.width));
      image.setAttribute("height", String(r.height));
      image.setAttribute("href", href);
      image.setAttribute("preserveAspectRatio", "none");
      image.setAttribute("style", "image-rendering: pixelated");
      root.appendChild(image);
    }
  }
  texts.forEach((t) => root.appendChild(t));
  return { text: new XMLSerializer().serializeToString(root), width, height };
}

export function exportSvg(el: HTMLElement | null, name: string): void {
  if (!el) return;
  const { text } = toSvg(el);
  download(new Blob([text], { type: "image/svg+xml" }), `vitscope-${name}.svg`);
}

/** The HTML parts of a container (boxes and text, no svgs or canvases) as one decoded SVG image. */
async function htmlLayer(el: HTMLElement, box: DOMRect): Promise<HTMLImageElement | null> {
  const root = document.createElementNS(SVG_NS, "svg");
  root.setAttribute("xmlns", SVG_NS);
  root.setAttribute("width", String(Math.max(1, Math.round(box.width))));
  root.setAttribute("height", String(Math.max(1, Math.round(box.height))));
  root.setAttribute("font-family", "system-ui, sans-serif");
  const defs = document.createElementNS(SVG_NS, "defs") as SVGDefsElement;
  root.appendChild(defs);
  const { boxes, texts } = htmlAsSvg(el, box, defs);
  [...boxes, ...texts].forEach((e) => root.appendChild(e));
  const img = new Image();
  img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(new XMLSerializer().serializeToString(root));
  try {
    await img.decode();
    return img;
  } catch {
    return null;
  }
}

/** A PNG of the element at `scale`x: canvases and images are copied directly (no re-encoding through
 * a data URL), and only the SVG parts are rasterised, each on its own, so a view full of canvases
 * saves in milliseconds and the download still counts as the user's click. */
export async function exportPng(el: HTMLElement | null, name: string, scale = 2): Promise<void> {
  if (!el) return;
  const box = el.getBoundingClientRect();
  const width = Math.max(1, Math.round(box.width));
  const height = Math.max(1, Math.round(box.height));
  const single = el instanceof SVGSVGElement || el instanceof HTMLCanvasElement || el instanceof HTMLImageElement;
  const parts: Element[] = single ? [el] : Array.from(el.querySelectorAll("svg, canvas, img")).filter((e) => !e.parentElement?.closest("svg"));
  const html = single ? null : await htmlLayer(el as HTMLElement, box);
  const layers = await Promise.all(
    parts.map(async (part) => {
      const r = part.getBoundingClientRect();
      if (r.width === 0 || r.height === 0) return null;
      if (part instanceof SVGSVGElement) {
        const { text } = toSvg(part as unknown as HTMLElement);
        const img = new Image();
        img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
        try {
          await img.decode();
        } catch {
          return null;
        }
        return { source: img as CanvasImageSource, r };
      }
      return { source: part as HTMLCanvasElement | HTMLImageElement, r };
    }),
  );
  const canvas = document.createElement("canvas");
  canvas.width = width * scale;
  canvas.height = height * scale;
  const ctx = canvas.getContext("2d")!;
  ctx.scale(scale, scale);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, width, height);
  ctx.imageSmoothingEnabled = false;
  if (html) ctx.drawImage(html, 0, 0, width, height);
  for (const layer of layers) {
    if (!layer) continue;
    try {
      ctx.drawImage(layer.source, layer.r.left - box.left, layer.r.top - box.top, layer.r.width, layer.r.height);
    } catch {
      /* an image that failed to load */
    }
  }
  const blob = await new Promise<Blob>((ok) => canvas.toBlob((b) => ok(b!), "image/png"));
  download(blob, `vitscope-${name}.png`);
}

function csvCell(v: unknown): string {
  if (v === null || v === undefined) return "";
  const s = typeof v === "number" && !Number.isFinite(v) ? "" : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export function exportCsv(rows: Rows, name: string): void {
  const cols = rows.length ? Object.keys(rows[0]) : [];
  const lines = [cols.join(","), ...rows.map((r) => cols.map((c) => csvCell(r[c])).join(","))];
  download(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }), `vitscope-${name}.csv`);
}
