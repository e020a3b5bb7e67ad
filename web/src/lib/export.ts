// Saving a view for a paper: SVG (vector, canvases embedded as images), PNG (2x raster of the same
// SVG) and CSV (the rows behind the view). All in the browser; nothing is sent anywhere.

export type Rows = Record<string, string | number | boolean | null>[];

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
  const parts: Element[] = el instanceof SVGSVGElement || el instanceof HTMLCanvasElement || el instanceof HTMLImageElement
    ? [el]
    : Array.from(el.querySelectorAll("svg, canvas, img")).filter((e) => !e.parentElement?.closest("svg"));
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
  return { text: new XMLSerializer().serializeToString(root), width, height };
}

export function exportSvg(el: HTMLElement | null, name: string): void {
  if (!el) return;
  const { text } = toSvg(el);
  download(new Blob([text], { type: "image/svg+xml" }), `vitscope-${name}.svg`);
}

/** A PNG of the element at `scale`x: canvases and images are copied directly (no re-encoding through
 * a data URL), and only the SVG parts are rasterised, each on its own, so a view full of canvases
 * saves in milliseconds and the download still counts as the user's click. */
export async function exportPng(el: HTMLElement | null, name: string, scale = 2): Promise<void> {
  if (!el) return;
  const box = el.getBoundingClientRect();
  const width = Math.max(1, Math.round(box.width));
  const height = Math.max(1, Math.round(box.height));
  const parts: Element[] = el instanceof SVGSVGElement || el instanceof HTMLCanvasElement || el instanceof HTMLImageElement
    ? [el]
    : Array.from(el.querySelectorAll("svg, canvas, img")).filter((e) => !e.parentElement?.closest("svg"));
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
