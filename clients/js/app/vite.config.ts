import { defineConfig } from "vite";

// `mqchat serve` serves the build under /app (bridge/http/webapp.py): hashed files in assets/
// are cached for ever, index.html is revalidated. `npm run dev` serves the sources with the
// API of a `make serve` running beside it.
const server = "http://127.0.0.1:8080";

export default defineConfig({
  base: "/app/",
  // @mqchat/client (../sdk, linked by npm) imports MQTT.js: bundle the app's one copy.
  resolve: { dedupe: ["mqtt"] },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    target: "es2022",
    modulePreload: { polyfill: false },
    reportCompressedSize: false,
  },
  server: {
    proxy: {
      "/v1": server,
      "/app/server.json": server,
      "/app/dev-token": server,
    },
  },
});
