// Builds dist/ from src/: the page, its stylesheet, and one bundle of src/main.js with its
// dependencies (Cytoscape.js, cytoscape-dagre) at the versions package-lock.json pins. The output
// is deterministic, so scripts/test-dashboard.sh rebuilds and compares it with the committed
// dist/, which the eventbus binary embeds (src/dashboard/assets.rs).
//
//   npm ci && npm run build
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";

const dist = new URL("./dist/", import.meta.url);
await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await build({
  entryPoints: [new URL("./src/main.js", import.meta.url).pathname],
  bundle: true,
  minify: true,
  format: "iife",
  target: ["chrome110", "firefox110", "safari16"],
  // The third-party licence comments, kept in one file beside the bundle.
  legalComments: "linked",
  outfile: new URL("./app.js", dist).pathname,
  logLevel: "warning",
});
for (const file of ["index.html", "app.css"]) {
  await copyFile(new URL(`./src/${file}`, import.meta.url), new URL(file, dist));
}
