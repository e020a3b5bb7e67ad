// The run's data as the views need it: loaded once at start-up, indexed into flat typed arrays so a
// redraw after a selection is a few array reads, never a scan of a table.
//
// First load: every request the first screen needs starts as early as it can, in parallel — the
// run description and the tables every run has at once, then (as soon as the run description and
// the images say what the first selection is) the other tables, the arrays the views load and the
// live model answers of the first selection — so the model and the network work while the browser
// decodes the tables and mounts the views, instead of after.
import { DataType, type Data, type Table } from "apache-arrow";
import { fetchArray, fetchRun, fetchTable, liveAttention, liveInteraction, livePartialPruning, type NdArray, type RunInfo } from "./api";
import { selection } from "./selection.svelte";

export interface ImageRows {
  n: number;
  imageId: Int32Array;
  label: Int32Array; // -1 = unknown
  labelName: string[];
  prediction: Int32Array;
  predictionName: string[];
  probability: Float64Array;
  baseProb: Float64Array;
  correct: Uint8Array;
  x: Float64Array;
  y: Float64Array;
  path: string[];
  rowOf: Map<number, number>; // image_id -> row
}

export interface PatternPoints {
  n: number;
  imageId: Int32Array;
  layer: Int32Array;
  head: Int32Array;
  x: Float32Array;
  y: Float32Array;
  cluster: Int32Array;
}

export interface RunData {
  info: RunInfo;
  L: number;
  H: number;
  images: ImageRows;
  heads: Table;
  /** heads-table column as a (L*H) array indexed by layer*H+head. */
  headColumn(name: string): Float64Array;
  /** image_heads column as (images*L*H), indexed by row*L*H + layer*H + head (row = images row). */
  imageHeadColumn(name: string): Float32Array;
  /** hop profiles of every (image, head): (images*L*H*G), same order, G hop distances. */
  hopProfiles: Float32Array;
  hopBins: number;
  curves: Table | null;
  agreement: Table | null;
  patterns: Record<string, PatternPoints>;
  /** pattern_clusters rows of each catalogue kind: cluster, size, share, name, x, y. */
  clusters: Record<string, { cluster: Int32Array; size: Float64Array; share: Float64Array; name: string[]; x: Float64Array; y: Float64Array }>;
  arrays: Map<string, NdArray>;
  /** A table or array loaded on demand (cached). */
  table(name: string): Promise<Table>;
  array(name: string, index?: number[]): Promise<NdArray>;
  /** A live answer: the one asked at start-up for `key` (once; see `liveKey`), else `ask()`. */
  live<T>(key: string, ask: () => Promise<T>): Promise<T>;
}

/** The key of a live query, e.g. `liveKey("attention", image, layer, head)`. */
export const liveKey = (endpoint: "attention" | "partial_pruning" | "interaction", image: number, layer: number, other: number) =>
  `${endpoint}/${image}/${layer}/${other}`;

function col<T>(t: Table, name: string): T[] {
  const c = t.getChild(name);
  return c ? (c.toArray() as unknown as T[]) : [];
}

/** Column values as numbers into `out`: int64 columns arrive as BigInt64Array, read here through
 * their 32-bit halves (exact below 2^53) instead of one BigInt conversion per value. */
function copyNumbers(a: ArrayLike<number | bigint | boolean>, out: Float64Array): void {
  if (a instanceof BigInt64Array || a instanceof BigUint64Array) {
    const w = new Int32Array(a.buffer, a.byteOffset, 2 * a.length); // little-endian: low word first
    const signed = a instanceof BigInt64Array;
    for (let i = 0; i < a.length; i++) {
      const hi = w[2 * i + 1];
      out[i] = (signed ? hi : hi >>> 0) * 4294967296 + (w[2 * i] >>> 0);
    }
  } else if (ArrayBuffer.isView(a)) {
    out.set(a as unknown as ArrayLike<number>);
  } else {
    for (let i = 0; i < a.length; i++) out[i] = Number(a[i]);
  }
}

function numbers(t: Table, name: string, fill = NaN): Float64Array {
  const c = t.getChild(name);
  const out = new Float64Array(t.numRows).fill(fill);
  if (!c) return out;
  if (c.nullCount === 0 && (DataType.isInt(c.type) || DataType.isFloat(c.type))) {
    // The fast path: the column's values as one typed array.
    copyNumbers(c.toArray() as ArrayLike<number | bigint>, out);
    return out;
  }
  for (let i = 0; i < t.numRows; i++) {
    const v = c.get(i);
    if (v !== null && v !== undefined) out[i] = Number(v);
  }
  return out;
}

function ints(t: Table, name: string, fill = -1): Int32Array {
  const f = numbers(t, name, fill);
  return Int32Array.from(f, (v) => (Number.isFinite(v) ? v : fill));
}

const utf8 = new TextDecoder();

/** One UTF-8 (or large UTF-8) chunk's strings into `out` from `at`. A row whose bytes equal the
 * previous row's reuses its string: the catalogue's `kind` column (200k rows at the paper's scale)
 * is long runs of a few values, and decoding each row on its own took a third of a second. */
function utf8Strings(chunk: Data, out: string[], at: number): void {
  const offsets = chunk.valueOffsets as unknown as ArrayLike<number | bigint>;
  const bytes = chunk.values as Uint8Array;
  const nulls = chunk.nullCount > 0;
  let ps = 0, pe = -1, prev = "";
  for (let r = 0; r < chunk.length; r++) {
    if (nulls && !chunk.getValid(r)) {
      out[at + r] = "";
      continue;
    }
    const s = Number(offsets[r]), e = Number(offsets[r + 1]);
    let same = e - s === pe - ps;
    for (let k = 0; same && k < e - s; k++) same = bytes[s + k] === bytes[ps + k];
    if (!same) {
      prev = utf8.decode(bytes.subarray(s, e));
      ps = s;
      pe = e;
    }
    out[at + r] = prev;
  }
}

function strings(t: Table, name: string): string[] {
  const c = t.getChild(name);
  const out: string[] = new Array(t.numRows).fill("");
  if (!c) return out;
  let at = 0;
  for (const chunk of c.data) {
    if (DataType.isUtf8(chunk.type) || DataType.isLargeUtf8(chunk.type)) utf8Strings(chunk, out, at);
    else for (let r = 0; r < chunk.length; r++) out[at + r] = String(c.get(at + r) ?? "");
    at += chunk.length;
  }
  return out;
}

function imageRows(t: Table): ImageRows {
  const imageId = ints(t, "image_id");
  const rowOf = new Map<number, number>();
  imageId.forEach((id, row) => rowOf.set(id, row));
  return {
    n: t.numRows,
    imageId,
    label: ints(t, "label"),
    labelName: strings(t, "label_name"),
    prediction: ints(t, "prediction"),
    predictionName: strings(t, "prediction_name"),
    probability: numbers(t, "probability"),
    baseProb: numbers(t, "base_prob"),
    correct: Uint8Array.from(numbers(t, "correct", 0), (v) => (v ? 1 : 0)),
    x: numbers(t, "overview_x"),
    y: numbers(t, "overview_y"),
    path: strings(t, "path"),
    rowOf,
  };
}

/** The catalogue rows of each kind, as typed arrays (one pass over the table for every kind). */
function patternPoints(t: Table, kinds: string[]): Record<string, PatternPoints> {
  const kind = strings(t, "kind");
  const cols = { imageId: numbers(t, "image_id"), layer: numbers(t, "layer"), head: numbers(t, "head"), x: numbers(t, "x"), y: numbers(t, "y"), cluster: numbers(t, "cluster") };
  const out: Record<string, PatternPoints> = {};
  for (const k of kinds) {
    let n = 0;
    for (let i = 0; i < kind.length; i++) if (kind[i] === k) n++;
    const p: PatternPoints = { n, imageId: new Int32Array(n), layer: new Int32Array(n), head: new Int32Array(n), x: new Float32Array(n), y: new Float32Array(n), cluster: new Int32Array(n) };
    for (let i = 0, j = 0; i < kind.length; i++) {
      if (kind[i] !== k) continue;
      p.imageId[j] = cols.imageId[i];
      p.layer[j] = cols.layer[i];
      p.head[j] = cols.head[i];
      p.x[j] = cols.x[i];
      p.y[j] = cols.y[i];
      p.cluster[j] = cols.cluster[i];
      j++;
    }
    out[k] = p;
  }
  return out;
}

function clamp(v: number, lo: number, hi: number): number {
  return Math.max(lo, Math.min(hi, v));
}

/** Keep the shared selection (read from a URL) inside the run's bounds. */
export function sanitiseSelection(info: RunInfo, images: ImageRows): void {
  const L = info.model.num_layers;
  const H = info.model.num_heads;
  const P = info.model.layout.grid[0] * info.model.layout.grid[1];
  if (!images.rowOf.has(selection.image)) selection.image = images.imageId[0] ?? 0;
  selection.layer = clamp(Math.round(selection.layer), 0, L - 1);
  selection.head = clamp(Math.round(selection.head), 0, H - 1);
  selection.ilayer = clamp(Math.round(selection.ilayer), 0, L - 1);
  selection.query = clamp(Math.round(selection.query), 0, P - 1);
  selection.mode = clamp(Math.round(selection.mode), 1, 6);
  if (!info.metrics.includes(selection.metric)) selection.metric = info.metrics[0] ?? "prob_drop";
  if (!info.capabilities.pattern_kinds.includes(selection.catalogue)) selection.catalogue = (info.capabilities.pattern_kinds[0] ?? "patch") as "patch" | "cls";
}

/** Whether the views ask the model for `endpoint` (the same test the views make). */
export function liveOn(info: RunInfo, endpoint: "attention" | "partial_pruning" | "interaction"): boolean {
  return info.live.available && (info.live.endpoints ?? [endpoint]).includes(endpoint);
}

/** Nobody may be waiting for a prefetched answer yet; its failure is met (and shown) by the view that
 * uses it, so it must not also surface as an unhandled rejection. */
function quiet<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

export async function loadRun(): Promise<RunData> {
  // Everything a run always has, at once (the server names these in the index page's preload
  // header, so they are usually on their way already).
  const infoP = fetchRun();
  const imagesP = quiet(fetchTable("images"));
  const headsP = quiet(fetchTable("heads"));
  const ihP = quiet(fetchTable("image_heads"));
  const info = await infoP;
  const L = info.model.num_layers;
  const H = info.model.num_heads;
  const has = (name: string) => info.tables.includes(name);
  const hasArray = (name: string) => info.arrays.includes(name);
  const optional = (name: string) => quiet(has(name) ? fetchTable(name) : Promise.resolve(null));
  const restP = Promise.all([optional("curves"), optional("agreement"), optional("patterns"), optional("pattern_clusters")]);

  const tableCache = new Map<string, Promise<Table>>();
  const arrayCache = new Map<string, Promise<NdArray>>();
  const table = (name: string) => {
    let p = tableCache.get(name);
    if (!p) tableCache.set(name, (p = quiet(fetchTable(name))));
    return p;
  };
  const array = (name: string, index: number[] = []) => {
    const key = `${name}[${index.join(",")}]`;
    let p = arrayCache.get(key);
    if (!p) arrayCache.set(key, (p = quiet(fetchArray(name, index))));
    return p;
  };

  const images = imageRows(await imagesP);
  sanitiseSelection(info, images);
  const s = selection.snapshot();

  // The first selection's live answers (views D, B and E ask for exactly these when they mount).
  const prefetched = new Map<string, Promise<unknown>>();
  if (liveOn(info, "attention")) prefetched.set(liveKey("attention", s.image, s.layer, s.head), quiet(liveAttention(s.image, s.layer, s.head)));
  if (liveOn(info, "interaction")) prefetched.set(liveKey("interaction", s.image, s.ilayer, s.query), quiet(liveInteraction(s.image, s.ilayer, s.query)));
  if (liveOn(info, "partial_pruning")) prefetched.set(liveKey("partial_pruning", s.image, s.layer, s.head), quiet(livePartialPruning(s.image, s.layer, s.head)));
  // The arrays and tables the views load when they mount (the same calls, so they share the cache).
  const kind = s.catalogue;
  if (info.capabilities.pattern_kinds.includes(kind)) {
    if (hasArray(`patterns/${kind}/density`)) array(`patterns/${kind}/density`);
    if (hasArray(`patterns/${kind}/prototypes`)) array(`patterns/${kind}/prototypes`);
  }
  if (!liveOn(info, "attention") && info.capabilities.attention_mean) array("attention_mean", [s.layer, s.head]);
  if (info.capabilities.interactions) {
    array("field_image_dx");
    array("field_image_dy");
    if (has("window_curve")) table("window_curve");
    if (has("removal_summary")) table("removal_summary");
    if (!liveOn(info, "interaction")) array("interaction_mean", [s.ilayer, s.query]);
  }
  if (info.capabilities.winft) array("winft_masks");

  const [headsT, ihT, [curves, agreement, patternsT, clustersT]] = await Promise.all([headsP, ihP, restP]);
  const LH = L * H;

  // image_heads rows -> flat positions row*L*H + layer*H + head
  const ihImage = ints(ihT, "image_id");
  const ihLayer = ints(ihT, "layer");
  const ihHead = ints(ihT, "head");
  const pos = new Int32Array(ihT.numRows);
  for (let i = 0; i < ihT.numRows; i++) {
    const row = images.rowOf.get(ihImage[i]);
    pos[i] = row === undefined ? -1 : row * LH + ihLayer[i] * H + ihHead[i];
  }
  const ihCache = new Map<string, Float32Array>();
  const imageHeadColumn = (name: string) => {
    let out = ihCache.get(name);
    if (!out) {
      out = new Float32Array(images.n * LH).fill(NaN);
      if (ihT.getChild(name)) {
        const v = numbers(ihT, name);
        for (let i = 0; i < ihT.numRows; i++) if (pos[i] >= 0) out[pos[i]] = v[i];
      }
      ihCache.set(name, out);
    }
    return out;
  };

  const hopCol = ihT.getChild("hop_profile");
  const hopBins = hopCol && ihT.numRows ? (hopCol.get(0)?.length ?? 0) : 0;
  const hopProfiles = new Float32Array(images.n * LH * hopBins).fill(NaN);
  if (hopCol) {
    // Read the list column's flat child values chunk by chunk (one typed array per record batch)
    // instead of one list object per row.
    let row = 0;
    for (const chunk of hopCol.data) {
      const offsets = chunk.valueOffsets as Int32Array;
      const child = chunk.children[0];
      const values = child.values as Float32Array | Float64Array;
      for (let r = 0; r < chunk.length; r++, row++) {
        if (pos[row] < 0) continue;
        const start = child.offset + offsets[chunk.offset + r];
        const n = Math.min(hopBins, offsets[chunk.offset + r + 1] - offsets[chunk.offset + r]);
        for (let g = 0; g < n; g++) hopProfiles[pos[row] * hopBins + g] = values[start + g];
      }
    }
  }

  const hLayer = ints(headsT, "layer");
  const hHead = ints(headsT, "head");
  const headCache = new Map<string, Float64Array>();
  const headColumn = (name: string) => {
    let out = headCache.get(name);
    if (!out) {
      out = new Float64Array(LH).fill(NaN);
      const v = numbers(headsT, name);
      for (let i = 0; i < headsT.numRows; i++) out[hLayer[i] * H + hHead[i]] = v[i];
      headCache.set(name, out);
    }
    return out;
  };

  const kinds = info.capabilities.pattern_kinds;
  const patterns: Record<string, PatternPoints> = patternsT ? patternPoints(patternsT, kinds) : {};
  const clusters: RunData["clusters"] = {};
  if (clustersT) {
    const ck = strings(clustersT, "kind");
    const names = strings(clustersT, "name");
    const cols = { cluster: numbers(clustersT, "cluster"), size: numbers(clustersT, "size"), share: numbers(clustersT, "share"), x: numbers(clustersT, "x"), y: numbers(clustersT, "y") };
    for (const kind of kinds) {
      const rows = ck.map((k, i) => (k === kind ? i : -1)).filter((i) => i >= 0);
      clusters[kind] = {
        cluster: Int32Array.from(rows, (i) => cols.cluster[i]),
        size: Float64Array.from(rows, (i) => cols.size[i]),
        share: Float64Array.from(rows, (i) => cols.share[i]),
        name: rows.map((i) => names[i]),
        x: Float64Array.from(rows, (i) => cols.x[i]),
        y: Float64Array.from(rows, (i) => cols.y[i]),
      };
    }
  }

  const arrays = new Map<string, NdArray>();
  return {
    info,
    L,
    H,
    images,
    heads: headsT,
    headColumn,
    imageHeadColumn,
    hopProfiles,
    hopBins,
    curves,
    agreement,
    patterns,
    clusters,
    arrays,
    table,
    array,
    live<T>(key: string, ask: () => Promise<T>): Promise<T> {
      const p = prefetched.get(key);
      if (!p) return ask();
      prefetched.delete(key);
      return p as Promise<T>;
    },
  };
}

/** Helpers shared by views. */
export const tokenOfPatch = (info: RunInfo, patch: number) => info.model.layout.num_prefix + patch;
export const numPatches = (info: RunInfo) => info.model.layout.grid[0] * info.model.layout.grid[1];
export { col, strings, numbers, ints };
