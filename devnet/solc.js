#!/usr/bin/env node
// A `solc`-compatible front end to solc-js for py-solc-x.
//
//   solc.js --version                 prints "solc, the solidity compiler ...\nVersion: X.Y.Z+commit.HASH..."
//   solc.js --standard-json [--base-path P] [--allow-paths A,B]   reads standard JSON on stdin,
//                                     writes ONLY the output JSON on stdout.
//
// solc-js's own CLI prints a ">>> Cannot retry compilation with SMT" line on stdout, which
// breaks JSON parsing, so this calls solc.compile() directly. Imports are resolved against
// --base-path, then each --allow-paths entry, then the project's node_modules (for
// @openzeppelin/...), refusing anything outside those roots.
"use strict";
const fs = require("fs");
const path = require("path");

const here = __dirname;
const projectRoot = path.resolve(here, "..");
const solc = require(require.resolve("solc", { paths: [projectRoot, process.cwd()] }));

const args = process.argv.slice(2);
function opt(name) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : null;
}

if (args.includes("--version")) {
  process.stdout.write("solc, the solidity compiler commandline interface\nVersion: " + solc.version() + "\n");
  process.exit(0);
}
if (!args.includes("--standard-json")) {
  process.stderr.write("usage: solc.js --version | --standard-json [--base-path P] [--allow-paths A,B] < input.json\n");
  process.exit(2);
}

const roots = [];
const base = opt("--base-path");
if (base) roots.push(path.resolve(base));
const allow = opt("--allow-paths");
if (allow) for (const a of allow.split(",")) if (a) roots.push(path.resolve(a));
roots.push(path.join(projectRoot, "node_modules"));
roots.push(path.join(process.cwd(), "node_modules"));

function findImports(importPath) {
  for (const root of roots) {
    const full = path.resolve(root, importPath);
    if (!full.startsWith(root + path.sep)) continue;
    if (fs.existsSync(full)) return { contents: fs.readFileSync(full, "utf8") };
  }
  return { error: "File not found in allowed roots: " + importPath };
}

const input = fs.readFileSync(0, "utf8");
const output = solc.compile(input, { import: findImports });
process.stdout.write(output);
