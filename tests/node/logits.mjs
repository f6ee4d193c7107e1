// llama.cpp's next-token logits for one prompt, with no adapter and with each given LoRA GGUF.
// Usage: node logits.mjs REQUEST.json  — {"model": path, "ids": [...], "adapters": {label: path}}; prints
// {"none": [...], label: [...]} (logits of the last position). tests/test_llama_cpp_runtime.py drives it.
import {getLlama} from "node-llama-cpp";
import fs from "node:fs";

const req = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath: req.model});
const out = {};
for (const [label, lora] of [["none", null], ...Object.entries(req.adapters)]) {
  const ctx = await model.createContext({contextSize: 128, ...(lora ? {lora: {adapters: [{filePath: lora}]}} : {})});
  const seq = ctx.getSequence();
  const last = req.ids.length - 1;
  const res = await seq.controlledEvaluate(req.ids.map((t, i) => i === last ? [t, {generateNext: {logits: true}}] : t));
  const logits = res[last].next.logits;
  const dense = [];
  for (const [t, v] of logits) dense[t] = v;
  out[label] = Array.from(dense, (v) => v ?? 0);
  await ctx.dispose();
}
process.stdout.write(JSON.stringify(out));
