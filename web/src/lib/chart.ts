// Drawing helpers shared by the views: colour scales that read well for colour-blind users, crisp
// canvases on high-DPI screens, and number formats.
import * as d3 from "d3";

/** Okabe & Ito's eight colours (distinguishable under the common colour-vision deficiencies), then
 * Tableau's ten for runs with more classes; beyond 18 classes colours repeat (the legend says so). */
export const CATEGORICAL = [
  "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
  ...d3.schemeTableau10,
];
export const categorical = (i: number) => (i < 0 ? "#9aa0a6" : CATEGORICAL[i % CATEGORICAL.length]);

/** Correct / incorrect: blue and vermillion (Okabe-Ito), never red/green. */
export const CORRECT = "#0072B2";
export const WRONG = "#D55E00";
/** The selection's highlight colour. */
export const HIGHLIGHT = "#D55E00";
/** CLS-token edges and marks versus patch ones. */
export const CLS_COLOUR = "#E69F00";
export const PATCH_COLOUR = "#0072B2";

/** Layers: viridis from dark (first layer) to yellow (last), perceptually ordered. */
export function layerColour(L: number): (layer: number) => string {
  return (layer) => d3.interpolateViridis(L <= 1 ? 0.5 : 0.05 + (0.85 * layer) / (L - 1));
}

/** Sequential values (attention, importance): viridis. */
export const sequential = d3.interpolateViridis;
/** Signed values (interaction impacts): purple-orange, symmetric around 0. */
export const diverging = (t: number) => d3.interpolatePuOr(1 - t);

/** Size a canvas for the device pixel ratio and return a cleared context in CSS pixels. */
export function setupCanvas(c: HTMLCanvasElement, width: number, height: number): CanvasRenderingContext2D {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(width * dpr));
  const h = Math.max(1, Math.round(height * dpr));
  if (c.width !== w || c.height !== h) {
    c.width = w;
    c.height = h;
  }
  c.style.width = `${width}px`;
  c.style.height = `${height}px`;
  const ctx = c.getContext("2d")!;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return ctx;
}

/** A rows x cols matrix as an image (one pixel per cell), to be scaled up with smoothing off. */
export function matrixImage(values: ArrayLike<number>, rows: number, cols: number, colour: (v: number) => string, offset = 0): HTMLCanvasElement {
  const c = document.createElement("canvas");
  c.width = cols;
  c.height = rows;
  const ctx = c.getContext("2d")!;
  const img = ctx.createImageData(cols, rows);
  const cache = new Map<string, [number, number, number]>();
  for (let i = 0; i < rows * cols; i++) {
    const v = values[offset + i];
    if (!Number.isFinite(v)) continue;
    const css = colour(v);
    let rgb = cache.get(css);
    if (!rgb) {
      const c2 = d3.rgb(css);
      rgb = [c2.r, c2.g, c2.b];
      cache.set(css, rgb);
    }
    img.data[4 * i] = rgb[0];
    img.data[4 * i + 1] = rgb[1];
    img.data[4 * i + 2] = rgb[2];
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

/** Draw many small translucent squares (a dense scatter's dots) straight into a cleared canvas's
 * pixels: squares of side `2 * r` (CSS pixels) centred at `(cx[j], cy[j])` (CSS pixels), square
 * `j` in colour `palette[colour[j]]` (an RGB triple, 0..1) at opacity `alpha`, later squares over
 * earlier ones. Edge pixels get the share of the square that covers them, as the canvas's own
 * anti-aliased `fillRect` does, so the result looks the same; but 100k `fillRect` calls cost the
 * browser a good part of a second and this a few tens of milliseconds. Call it right after
 * `setupCanvas`, before anything else is drawn (it replaces the canvas's pixels). */
export function paintSquares(
  ctx: CanvasRenderingContext2D,
  cx: ArrayLike<number>,
  cy: ArrayLike<number>,
  colour: ArrayLike<number>,
  palette: [number, number, number][],
  r: number,
  alpha: number,
): void {
  const W = ctx.canvas.width;
  const Hc = ctx.canvas.height;
  const k = ctx.getTransform().a || 1; // device pixels per CSS pixel (setupCanvas's scale)
  const acc = new Float32Array(W * Hc * 4); // premultiplied RGBA in 0..1, composited "source-over"
  const half = r * k;
  for (let j = 0; j < cx.length; j++) {
    const x = cx[j] * k, y = cy[j] * k;
    if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
    const [cr, cg, cb] = palette[colour[j]];
    const x0 = x - half, x1 = x + half, y0 = y - half, y1 = y + half;
    const px0 = Math.max(0, Math.floor(x0)), px1 = Math.min(W, Math.ceil(x1));
    const py0 = Math.max(0, Math.floor(y0)), py1 = Math.min(Hc, Math.ceil(y1));
    for (let py = py0; py < py1; py++) {
      const cover = Math.min(y1, py + 1) - Math.max(y0, py);
      for (let px = px0; px < px1; px++) {
        const a = alpha * cover * (Math.min(x1, px + 1) - Math.max(x0, px));
        if (a <= 0) continue;
        const o = 4 * (py * W + px), keep = 1 - a;
        acc[o] = cr * a + acc[o] * keep;
        acc[o + 1] = cg * a + acc[o + 1] * keep;
        acc[o + 2] = cb * a + acc[o + 2] * keep;
        acc[o + 3] = a + acc[o + 3] * keep;
      }
    }
  }
  const img = ctx.createImageData(W, Hc);
  const d = img.data;
  for (let o = 0; o < acc.length; o += 4) {
    const a = acc[o + 3];
    if (a <= 0) continue;
    d[o] = (255 * acc[o]) / a;
    d[o + 1] = (255 * acc[o + 1]) / a;
    d[o + 2] = (255 * acc[o + 2]) / a;
    d[o + 3] = 255 * a;
  }
  ctx.putImageData(img, 0, 0);
}

/** `scale(v)` of every value: a d3 linear scale's own formula (domain and range of two values, no
 * clamping) without a function call per value. */
export function mapLinear(scale: d3.ScaleLinear<number, number>, values: ArrayLike<number>, order?: ArrayLike<number>): Float32Array {
  const [d0, d1] = scale.domain();
  const [r0, r1] = scale.range();
  const n = order ? order.length : values.length;
  const out = new Float32Array(n);
  const span = d1 - d0;
  for (let j = 0; j < n; j++) {
    const t = ((order ? values[order[j]] : values[j]) - d0) / span;
    out[j] = r0 * (1 - t) + r1 * t;
  }
  return out;
}

/** An RGB triple (0..1 each) of a CSS colour. */
export function rgbOf(css: string): [number, number, number] {
  const c = d3.rgb(css);
  return [c.r / 255, c.g / 255, c.b / 255];
}

/** Minimum and maximum of the finite values (a fallback range when there are none). */
export function finiteExtent(values: ArrayLike<number>, fallback: [number, number] = [0, 1]): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (Number.isFinite(v)) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (lo === Infinity) return fallback;
  if (lo === hi) return [lo - 0.5, hi + 0.5];
  return [lo, hi];
}

export const fmt = (v: number | null | undefined, digits = 3) =>
  v === null || v === undefined || !Number.isFinite(v) ? "–" : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toFixed(digits);

/** Render a d3 axis into an SVG <g> (Svelte owns the rest of the SVG). */
export function axis(node: SVGGElement, make: () => d3.Axis<any>) {
  const draw = () => d3.select(node).call(make()).call((g) => g.selectAll("text").attr("font-size", 10));
  draw();
  return { update(next: () => d3.Axis<any>) { make = next; draw(); } };
}

/** A rows x cols grid of values on a canvas, viridis over `domain`, with cells of `cell` px, row and
 *  column numbers (`rowLabel` names a row) and, when given, the selected cell outlined. The grid
 *  starts at (20, 12): pick a cell from a click with the same offsets. */
export function drawCellGrid(
  c: HTMLCanvasElement, values: ArrayLike<number>, rows: number, cols: number, cell: number, domain: [number, number],
  { rowLabel = String, selected }: { rowLabel?: (r: number) => string; selected?: [number, number] } = {},
): void {
  const ctx = setupCanvas(c, cell * cols + 24, cell * rows + 14);
  const scale = d3.scaleLinear().domain(domain).range([0, 1]).clamp(true);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(matrixImage(values, rows, cols, (v) => sequential(scale(v))), 20, 12, cell * cols, cell * rows);
  ctx.fillStyle = "#656d76";
  ctx.font = "9px system-ui";
  ctx.textAlign = "right";
  for (let r = 0; r < rows; r += rows > 12 ? 2 : 1) ctx.fillText(rowLabel(r), 17, 12 + (r + 0.75) * cell);
  ctx.textAlign = "center";
  for (let h = 0; h < cols; h += cols > 12 ? 2 : 1) ctx.fillText(String(h), 20 + (h + 0.5) * cell, 9);
  if (selected) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 2;
    ctx.strokeRect(20 + selected[1] * cell, 12 + selected[0] * cell, cell, cell);
  }
}
