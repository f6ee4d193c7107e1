// Evaluate the same tokens in llama.cpp with no adapter, ours.gguf and wrong.gguf; see make.py.
import {getLlama} from "node-llama-cpp";
import fs from "node:fs";
const WORK = process.env.WORK || "/tmp/llama-cpp-check";
const ref = JSON.parse(fs.readFileSync(WORK + "/ref.json"));
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath: ref.model});
const out = {};
for (const [label, lora] of [["none", null], ["ours", WORK + "/ours.gguf"], ["wrong", WORK + "/wrong.gguf"]]) {
  const ctx = await model.createContext({contextSize: 256, ...(lora ? {lora: {adapters: [{filePath: lora}]}} : {})});
  const seq = ctx.getSequence();
  const input = ref.ids.map((t, i) => i === ref.ids.length - 1 ? [t, {generateNext: {logits: true}}] : t);
  const res = await seq.controlledEvaluate(input);
  const logits = res[ref.ids.length - 1].next.logits;
  const arr = new Array(ref.base.length).fill(0);
  for (const [t, v] of logits) arr[t] = v;
  out[label] = arr;
  await ctx.dispose();
}
fs.writeFileSync(WORK + "/llamacpp.json", JSON.stringify(out));
console.log("done");
