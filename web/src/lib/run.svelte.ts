// The run's data as the views need it: loaded once at start-up, indexed into flat typed arrays so a
// redraw after a selection is a few array reads, never a scan of a table.
import type { Table } from "apache-arrow";
import { fetchArray, fetchRun, fetchTable, type NdArray, type RunInfo } from "./api";

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
}

function col<T>(t: Table, name: string): T[] {
  const c = t.getChild(name);
  return c ? (c.toArray() as unknown as T[]) : [];
}

function numbers(t: Table, name: string, fill = NaN): Float64Array {
  const c = t.getChild(name);
  const out = new Float64Array(t.numRows).fill(fill);
  if (!c) return out;
  if (c.nullCount === 0 && (c.type.typeId === 2 || c.type.typeId === 3) /* Int, Float */) {
    // The fast path: the column's values as one typed array (int64 arrives as BigInt64Array).
    const a = c.toArray() as ArrayLike<number | bigint | boolean>;
    for (let i = 0; i < a.length; i++) out[i] = Number(a[i]);
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

function strings(t: Table, name: string): string[] {
  const c = t.getChild(name);
  const out: string[] = [];
  for (let i = 0; i < t.numRows; i++) out.push(c ? String(c.get(i) ?? "") : "");
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

function patternPoints(t: Table, kind: string): PatternPoints {
  const kinds = strings(t, "kind");
  const keep: number[] = [];
  kinds.forEach((k, i) => k === kind && keep.push(i));
  const pick = (name: string) => {
    const all = numbers(t, name);
    return keep.map((i) => all[i]);
  };
  return {
    n: keep.length,
    imageId: Int32Array.from(pick("image_id")),
    layer: Int32Array.from(pick("layer")),
    head: Int32Array.from(pick("head")),
    x: Float32Array.from(pick("x")),
    y: Float32Array.from(pick("y")),
    cluster: Int32Array.from(pick("cluster")),
  };
}

export async function loadRun(): Promise<RunData> {
  const info = await fetchRun();
  const L = info.model.num_layers;
  const H = info.model.num_heads;
  const has = (name: string) => info.tables.includes(name);
  const [imagesT, headsT, ihT, curves, agreement, patternsT, clustersT] = await Promise.all([
    fetchTable("images"),
    fetchTable("heads"),
    fetchTable("image_heads"),
    has("curves") ? fetchTable("curves") : Promise.resolve(null),
    has("agreement") ? fetchTable("agreement") : Promise.resolve(null),
    has("patterns") ? fetchTable("patterns") : Promise.resolve(null),
    has("pattern_clusters") ? fetchTable("pattern_clusters") : Promise.resolve(null),
  ]);
  const images = imageRows(imagesT);
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

  const patterns: Record<string, PatternPoints> = {};
  const clusters: RunData["clusters"] = {};
  for (const kind of info.capabilities.pattern_kinds) {
    if (patternsT) patterns[kind] = patternPoints(patternsT, kind);
    if (clustersT) {
      const kinds = strings(clustersT, "kind");
      const rows = kinds.map((k, i) => (k === kind ? i : -1)).filter((i) => i >= 0);
      const pick = (name: string) => rows.map((i) => Number(clustersT.getChild(name)?.get(i) ?? NaN));
      const names = strings(clustersT, "name");
      clusters[kind] = {
        cluster: Int32Array.from(pick("cluster")),
        size: Float64Array.from(pick("size")),
        share: Float64Array.from(pick("share")),
        name: rows.map((i) => names[i]),
        x: Float64Array.from(pick("x")),
        y: Float64Array.from(pick("y")),
      };
    }
  }

  const tableCache = new Map<string, Promise<Table>>();
  const arrayCache = new Map<string, Promise<NdArray>>();
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
    table(name) {
      let p = tableCache.get(name);
      if (!p) tableCache.set(name, (p = fetchTable(name)));
      return p;
    },
    array(name, index = []) {
      const key = `${name}[${index.join(",")}]`;
      let p = arrayCache.get(key);
      if (!p) arrayCache.set(key, (p = fetchArray(name, index)));
      return p;
    },
  };
}

/** Helpers shared by views. */
export const tokenOfPatch = (info: RunInfo, patch: number) => info.model.layout.num_prefix + patch;
export const numPatches = (info: RunInfo) => info.model.layout.grid[0] * info.model.layout.grid[1];
export { col, strings, numbers, ints };
