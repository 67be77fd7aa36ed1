// Runs the compiled client against a live service (used by tests/db/test_serve_typescript.py).
// Usage: node run.mjs <compiled index.js> ; settings in the environment. Prints JSON.
import { readFile } from "node:fs/promises";
import { basename } from "node:path";

const { configure, searchByImage, searchSimilarScenes, searchByText, HeimdexClipError } =
  await import(process.argv[2]);
const env = process.env;
configure({ baseUrl: env.HEIMDEX_URL, apiKey: env.HEIMDEX_KEY });

const imageFile = new File([await readFile(env.HEIMDEX_IMAGE)], basename(env.HEIMDEX_IMAGE),
  { type: "image/png" });
const out = {
  image: await searchByImage({ imageFile, matchThreshold: -1, matchCount: 20 }),
  scene: await searchSimilarScenes({ sceneId: env.HEIMDEX_SCENE, matchThreshold: -1, matchCount: 20 }),
  text: await searchByText({ query: env.HEIMDEX_TEXT, matchThreshold: -1, matchCount: 20 }),
};
try {
  await searchSimilarScenes({ sceneId: env.HEIMDEX_FOREIGN_SCENE, matchThreshold: 0.7, matchCount: 20 });
  out.foreign = "answered";
} catch (error) {
  out.foreign = error instanceof HeimdexClipError ? { status: error.status, message: error.message } : String(error);
}
console.log(JSON.stringify(out));
