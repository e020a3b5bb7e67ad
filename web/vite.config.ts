import { defineConfig } from "vite";
import { svelte } from "@sveltejs/vite-plugin-svelte";

// The built app ships inside the Python package, served by `vitscope serve`.
export default defineConfig({
  plugins: [svelte()],
  base: "./",
  build: {
    outDir: "../src/vitscope/server/static",
    emptyOutDir: true,
    assetsDir: "assets",
    chunkSizeWarningLimit: 2000,
  },
  server: {
    // `npm run dev` against a running `vitscope serve RUN` on the default port.
    proxy: { "/api": "http://127.0.0.1:8765" },
  },
});
