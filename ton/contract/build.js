// Build step for the channel contract: compiles channel.tolk with @ton/tolk-js (WASM, offline)
// and writes channel.boc (code cell) and channel.json (code hash, compiler version).
// Usage: `npm ci && node build.js` (or `node build.js --check` to compare with the committed code).
"use strict";
const fs = require("fs");
const path = require("path");
const { runTolkCompiler, getTolkCompilerVersion } = require("@ton/tolk-js");

async function main() {
  const here = __dirname;
  const check = process.argv.includes("--check");
  const result = await runTolkCompiler({
    entrypointFileName: "channel.tolk",
    fsReadCallback: (p) => fs.readFileSync(path.join(here, p), "utf-8"),
  });
  if (result.status !== "ok") {
    console.error(result.message);
    process.exit(1);
  }
  const version = await getTolkCompilerVersion();
  const boc = Buffer.from(result.codeBoc64, "base64");
  const meta = { compiler: "@ton/tolk-js", tolk: version, codeHashHex: result.codeHashHex, bocBytes: boc.length };
  if (check) {
    console.log(JSON.stringify(meta));
    return;
  }
  fs.writeFileSync(path.join(here, "channel.boc"), boc);
  fs.writeFileSync(path.join(here, "channel.json"), JSON.stringify(meta, null, 2) + "\n");
  if (process.argv.includes("--fift")) {
    fs.writeFileSync(path.join(here, "channel.fif"), result.fiftCode);
  }
  console.log(JSON.stringify(meta));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
