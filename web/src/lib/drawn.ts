// Draw bookkeeping: every view calls `markDrawn(view)` at the end of each redraw. The shell waits for
// all views to have drawn once before it flags the page ready, and the browser tests and the
// benchmarks read `window.vitscope` to know when a selection has reached every view.
import { selection, type SelectionState } from "./selection.svelte";

export const VIEWS = ["image-overview", "head-importance", "attention-strength", "attention-pattern", "patch-interactions"] as const;
export type ViewId = (typeof VIEWS)[number];

interface DrawState {
  /** performance.now() of each view's latest redraw. */
  last: Record<string, number>;
  /** how many redraws each view has made. */
  count: Record<string, number>;
  /** Views waiting for a live answer (their latest redraw is not final yet). */
  pending: Set<string>;
}

const state: DrawState = { last: {}, count: {}, pending: new Set() };
const tables = new Map<string, () => Record<string, unknown>[]>();

/** The rows behind a view (the ones its CSV export saves); the tests compare them with the run. */
export function registerTable(view: string, rows: () => Record<string, unknown>[]): void {
  tables.set(view, rows);
}
const listeners = new Set<() => void>();

/** A view finished drawing what the current selection asks of it. */
export function markDrawn(view: ViewId | string): void {
  state.last[view] = performance.now();
  state.count[view] = (state.count[view] ?? 0) + 1;
  state.pending.delete(view);
  const el = document.querySelector(`[data-view="${view}"]`);
  if (el) el.setAttribute("data-drawn", String(state.count[view]));
  listeners.forEach((f) => f());
}

/** A view started async work (a live query, a table or array fetch) for the current selection: call
 * this synchronously inside the effect, before the first await, and markDrawn once the answer is
 * drawn (also when it failed or was superseded). Tests and benchmarks wait until nothing is
 * pending, so a view that forgets this is measured before it has drawn. */
export function markPending(view: ViewId | string): void {
  state.pending.add(view);
}

export function allDrawnOnce(): boolean {
  return VIEWS.every((v) => (state.count[v] ?? 0) > 0);
}

export function onDrawn(f: () => void): () => void {
  listeners.add(f);
  return () => listeners.delete(f);
}

/** The hooks the browser tests and benchmarks drive (no effect on the app itself). */
export interface VitscopeHooks {
  select(patch: Partial<SelectionState>): void;
  selection(): SelectionState;
  drawn: DrawState;
  ready: boolean;
  /** The rows a view shows now (its CSV export), e.g. `vitscope.table("head-importance")`. */
  table(view: string): Record<string, unknown>[] | null;
}

export function installHooks(): VitscopeHooks {
  const hooks: VitscopeHooks = {
    select: (patch) => selection.set(patch),
    selection: () => selection.snapshot(),
    drawn: state,
    ready: false,
    table: (view) => {
      const rows = tables.get(view);
      return rows ? JSON.parse(JSON.stringify(rows())) : null;
    },
  };
  (window as unknown as { vitscope: VitscopeHooks }).vitscope = hooks;
  return hooks;
}
