// The one place that talks to the server (docs/api.md). Tables arrive as Arrow IPC streams, arrays
// as raw typed arrays; nothing dense travels as JSON.
import { tableFromIPC, type Table } from "apache-arrow";

export type Dtype = "float32" | "float64" | "int32" | "uint8";

export interface NdArray {
  dtype: Dtype;
  shape: number[];
  data: Float32Array | Float64Array | Int32Array | Uint8Array;
  attrs: Record<string, unknown>;
}

export interface Layout {
  num_prefix: number;
  cls_index: number | null;
  dist_index: number | null;
  register_indices: number[];
  grid: [number, number];
  patch_size: [number, number];
  num_tokens: number;
}

export interface RunInfo {
  path: string;
  manifest: Record<string, any>;
  model: {
    spec: string;
    num_layers: number;
    num_heads: number;
    num_classes: number;
    class_names: string[];
    layout: Layout;
    image_size: [number, number];
  };
  live: {
    available: boolean;
    reason: string | null;
    device: string | null;
    /** Set when the loaded weights differ from the run's: live answers then differ from its tables. */
    warning?: string | null;
    /** The live endpoints that answer ("attention", "partial_pruning", "interaction"). */
    endpoints?: string[];
  };
  capabilities: {
    cls: boolean;
    labels: boolean;
    interactions: boolean;
    winft: boolean;
    pattern_kinds: string[];
    attention_mean: boolean;
  };
  metrics: string[];
  /** Readable name of each metric, from the server's metric registry. */
  metric_labels?: Record<string, string>;
  strength_measures: string[];
  modes: { mode: number; region: string }[];
  tables: string[];
  arrays: string[];
}

export interface PartialPruning {
  image_id: number;
  layer: number;
  head: number;
  label: number;
  label_name: string;
  modes: { mode: number; region: string; label_prob: number; top: { class: number; name: string; prob: number }[] }[];
  elapsed_ms: number;
}

/** An error answered by the server: `code` is its `error` field (e.g. "no_model", "superseded"). */
export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    public detail: string,
  ) {
    super(detail || code);
  }
}

/** One id per browser tab, so the server can supersede this tab's older live queries. */
export const CLIENT_ID = Math.random().toString(36).slice(2, 10);

const base = new URL("./", window.location.href);

function url(path: string, params: Record<string, string | number | undefined> = {}): string {
  const u = new URL(path.replace(/^\//, ""), base);
  for (const [k, v] of Object.entries(params)) if (v !== undefined) u.searchParams.set(k, String(v));
  return u.toString();
}

async function get(path: string, params: Record<string, string | number | undefined> = {}, signal?: AbortSignal): Promise<Response> {
  const res = await fetch(url(path, params), { signal });
  if (!res.ok) {
    let code = `http_${res.status}`;
    let detail = res.statusText;
    try {
      const body = await res.json();
      code = body.error ?? code;
      detail = body.detail ?? detail;
    } catch {
      /* not JSON */
    }
    throw new ApiError(res.status, code, detail);
  }
  return res;
}

export async function fetchRun(): Promise<RunInfo> {
  return (await get("api/run")).json();
}

export async function fetchTable(name: string, columns?: string[]): Promise<Table> {
  const res = await get(`api/table/${encodeURIComponent(name)}`, { columns: columns?.join(",") });
  return tableFromIPC(new Uint8Array(await res.arrayBuffer()));
}

function toNdArray(res: Response, buf: ArrayBuffer): NdArray {
  const dtype = (res.headers.get("X-Vitscope-Dtype") ?? "float32") as Dtype;
  const shapeText = res.headers.get("X-Vitscope-Shape") ?? "";
  const shape = shapeText === "" ? [] : shapeText.split(",").map(Number);
  const attrs = JSON.parse(res.headers.get("X-Vitscope-Attrs") ?? "{}");
  const Ctor = { float32: Float32Array, float64: Float64Array, int32: Int32Array, uint8: Uint8Array }[dtype];
  return { dtype, shape, data: new Ctor(buf), attrs };
}

export async function fetchArray(name: string, index: number[] = []): Promise<NdArray> {
  const path = `api/array/${name.split("/").map(encodeURIComponent).join("/")}`;
  const res = await get(path, { index: index.length ? index.join(",") : undefined });
  return toNdArray(res, await res.arrayBuffer());
}

export function imageUrl(imageId: number, size?: number): string {
  return url(`api/image/${imageId}.png`, { size });
}

export async function liveAttention(imageId: number, layer: number, head: number, signal?: AbortSignal): Promise<NdArray> {
  const res = await get(`api/live/attention/${imageId}/${layer}/${head}`, { client: CLIENT_ID }, signal);
  return toNdArray(res, await res.arrayBuffer());
}

export async function livePartialPruning(imageId: number, layer: number, head: number, signal?: AbortSignal): Promise<PartialPruning> {
  return (await get(`api/live/partial_pruning/${imageId}/${layer}/${head}`, { client: CLIENT_ID }, signal)).json();
}

export async function liveInteraction(imageId: number, layer: number, query: number, signal?: AbortSignal): Promise<NdArray> {
  const res = await get(`api/live/interaction/${imageId}/${layer}/${query}`, { client: CLIENT_ID }, signal);
  return toNdArray(res, await res.arrayBuffer());
}
