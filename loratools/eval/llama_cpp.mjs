// llama.cpp's next-token logits and greedy answers for `loratools eval` (node-llama-cpp's prebuilt CPU build).
// Usage: node llama_cpp.mjs REQUEST.json, where REQUEST is
//   {"nlc": ".../node-llama-cpp/dist/index.js", "model": gguf, "lora": gguf or null, "vocab": V, "context": n,
//    "examples": [{"ids": [...], "positions": [...]}], "greedy": [[prompt ids], ...], "n_greedy": N,
//    "eos": id or null, "out": path}
// It writes the logits at each example's positions, float32 little-endian, example after example
// (positions × V each), to `out`, and prints {"greedy": [[ids], ...]}. One thread unless "threads" says more:
// llama.cpp's threads spin while they wait, and on a busy shared CPU (2 cores, load 10) two threads ran one
// position in ~3.5 s against ~0.1 s with one.
import fs from "node:fs";
import {pathToFileURL} from "node:url";

const req = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const {getLlama} = await import(pathToFileURL(req.nlc).href);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath: req.model});
const ctx = await model.createContext({contextSize: req.context, threads: req.threads ?? 1, ...(req.lora ? {lora: {adapters: [{filePath: req.lora}]}} : {})});
const seq = ctx.getSequence();
const out = fs.openSync(req.out, "w");

function dense(logits) {
  const row = new Float32Array(req.vocab);
  for (const [t, v] of logits) if (t < req.vocab) row[t] = v;
  return row;
}

for (const ex of req.examples) {
  await seq.clearHistory();
  const want = new Set(ex.positions);
  const res = await seq.controlledEvaluate(ex.ids.map((t, i) => want.has(i) ? [t, {generateNext: {logits: true}}] : t));
  for (const p of ex.positions) fs.writeSync(out, Buffer.from(dense(res[p].next.logits).buffer));
}
fs.closeSync(out);

const greedy = [];
for (const prompt of req.greedy) {
  await seq.clearHistory();
  const answer = [];
  let res = await seq.controlledEvaluate(prompt.map((t, i) => i === prompt.length - 1 ? [t, {generateNext: {logits: true}}] : t));
  let logits = res[prompt.length - 1].next.logits;
  while (answer.length < req.n_greedy) {
    let best = -1, bestV = -Infinity;
    for (const [t, v] of logits) if (v > bestV || (v === bestV && t < best)) { best = t; bestV = v; }
    answer.push(best);
    if (best === req.eos || answer.length === req.n_greedy) break;
    res = await seq.controlledEvaluate([[best, {generateNext: {logits: true}}]]);
    logits = res[0].next.logits;
  }
  greedy.push(answer);
}
await ctx.dispose();
await model.dispose();
process.stdout.write(JSON.stringify({greedy}));
