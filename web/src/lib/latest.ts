// Async queries where only the newest counts (a live answer for the current selection): an older
// query is aborted, its late answer dropped, and an abort or a server "superseded" is not an error.
import { ApiError } from "./api";

export interface Handlers<T> {
  ok: (value: T) => void;
  error: (message: string) => void;
  /** After the newest query settled (answer, error or superseded). */
  done: () => void;
}

export function latestQuery() {
  let current: AbortController | null = null;
  return function ask<T>(query: (signal: AbortSignal) => Promise<T>, on: Handlers<T>): void {
    current?.abort();
    const mine = (current = new AbortController());
    query(mine.signal)
      .then((v) => mine === current && on.ok(v))
      .catch((e) => {
        if (mine !== current || e?.name === "AbortError" || (e instanceof ApiError && e.code === "superseded")) return;
        on.error(String(e?.message ?? e));
      })
      .finally(() => mine === current && on.done());
  };
}
