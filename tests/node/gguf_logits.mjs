// Next-token logits of llama.cpp (node-llama-cpp's prebuilt CPU build) for each run in $SPEC (JSON):
// {"nlc": ".../node-llama-cpp/dist/index.js", "ids": [...], "runs": [{"model": m, "lora": a|null}], "out": path}
import fs from "node:fs";
import {pathToFileURL} from "node:url";
const spec = JSON.parse(fs.readFileSync(process.env.SPEC));
const {getLlama} = await import(pathToFileURL(spec.nlc).href);
const llama = await getLlama({gpu: false, build: "never"});
const out = [];
for (const run of spec.runs) {
  const model = await llama.loadModel({modelPath: run.model});
  const ctx = await model.createContext({contextSize: 256, ...(run.lora ? {lora: {adapters: [{filePath: run.lora}]}} : {})});
  const seq = ctx.getSequence();
  const input = spec.ids.map((t, i) => i === spec.ids.length - 1 ? [t, {generateNext: {logits: true}}] : t);
  const res = await seq.controlledEvaluate(input);
  const arr = new Array(spec.vocab).fill(0);
  for (const [t, v] of res[spec.ids.length - 1].next.logits) arr[t] = v;
  out.push(arr);
  await ctx.dispose();
  await model.dispose();
}
fs.writeFileSync(spec.out, JSON.stringify(out));
