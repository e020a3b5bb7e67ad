// The one shared selection every view reads and writes. It lives in the URL's hash so a reload or a
// shared link restores the same state (permalinks), and the browser's back button undoes a change.

export type Catalogue = "patch" | "cls";
export type ColourBy = "class" | "correct";
export type StrengthMeasure = "entropy" | "mean_distance";

export interface SelectionState {
  image: number; // image_id
  layer: number;
  head: number;
  query: number; // source patch, 0-based patch index (not token index)
  mode: number; // partial-pruning mode 1..6
  metric: string; // importance metric of the heads table
  catalogue: Catalogue;
  colour: ColourBy;
  strength: StrengthMeasure;
  threshold: number; // attention value threshold of the bipartite view
  ilayer: number; // layer shown by the patch-interaction view
}

export const DEFAULTS: SelectionState = {
  image: 0,
  layer: 0,
  head: 0,
  query: 0,
  mode: 2,
  metric: "prob_drop",
  catalogue: "patch",
  colour: "class",
  strength: "entropy",
  threshold: 0.02,
  ilayer: 0,
};

const NUMERIC: (keyof SelectionState)[] = ["image", "layer", "head", "query", "mode", "threshold", "ilayer"];

export function parseHash(hash: string): Partial<SelectionState> {
  const out: Record<string, unknown> = {};
  const params = new URLSearchParams(hash.replace(/^#/, ""));
  for (const key of Object.keys(DEFAULTS) as (keyof SelectionState)[]) {
    const v = params.get(key);
    if (v === null) continue;
    if (NUMERIC.includes(key)) {
      const n = Number(v);
      if (Number.isFinite(n)) out[key] = n;
    } else out[key] = v;
  }
  return out as Partial<SelectionState>;
}

export function toHash(s: SelectionState): string {
  const params = new URLSearchParams();
  for (const key of Object.keys(DEFAULTS) as (keyof SelectionState)[]) params.set(key, String(s[key]));
  return "#" + params.toString();
}

class Selection {
  image = $state(DEFAULTS.image);
  layer = $state(DEFAULTS.layer);
  head = $state(DEFAULTS.head);
  query = $state(DEFAULTS.query);
  mode = $state(DEFAULTS.mode);
  metric = $state(DEFAULTS.metric);
  catalogue = $state<Catalogue>(DEFAULTS.catalogue);
  colour = $state<ColourBy>(DEFAULTS.colour);
  strength = $state<StrengthMeasure>(DEFAULTS.strength);
  threshold = $state(DEFAULTS.threshold);
  ilayer = $state(DEFAULTS.ilayer);

  snapshot(): SelectionState {
    return {
      image: this.image,
      layer: this.layer,
      head: this.head,
      query: this.query,
      mode: this.mode,
      metric: this.metric,
      catalogue: this.catalogue,
      colour: this.colour,
      strength: this.strength,
      threshold: this.threshold,
      ilayer: this.ilayer,
    };
  }

  /** Apply a partial state (from the URL, a click, a key press). */
  set(patch: Partial<SelectionState>): void {
    Object.assign(this, patch);
  }

  /** Select a head, the most common action. */
  selectHead(layer: number, head: number): void {
    this.layer = layer;
    this.head = head;
  }
}

/** The shared selection. Import it, read its fields inside `$derived`/`$effect`, assign to change. */
export const selection = new Selection();
