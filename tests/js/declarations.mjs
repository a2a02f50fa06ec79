// broker/static/broker.d.ts, generated from broker.js's JSDoc types by the pinned TypeScript
// compiler (tests/js/package.json), so that the declarations cannot drift from the code.
//
//   node tests/js/declarations.mjs           write broker/static/broker.d.ts
//   node tests/js/declarations.mjs --check   exit 1 when the committed file differs
//
// tsc's declaration emit with two changes: class members whose name starts with `_`, and
// declarations tagged `@internal`, are left out (tsc's --stripInternal does not apply to
// JavaScript sources), and a header says where the file comes from.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const ts = createRequire(import.meta.url)("typescript");
const SOURCE = resolve(here, "../../broker/static/broker.js");
const TARGET = resolve(here, "../../broker/static/broker.d.ts");
const HEADER =
  "// Type declarations for broker.js, the broker's client library (docs/web.md).\n" +
  "// Generated from broker.js's JSDoc by tests/js/declarations.mjs (TypeScript " +
  ts.version +
  "): do not edit;\n// change the JSDoc in broker.js and run `node tests/js/declarations.mjs`.\n\n";

function emitted() {
  const config = ts.getParsedCommandLineOfConfigFile(join(here, "tsconfig.broker.json"), {}, {
    ...ts.sys,
    onUnRecoverableConfigFileDiagnostic: (d) => {
      throw new Error(ts.flattenDiagnosticMessageText(d.messageText, "\n"));
    },
  });
  const options = { ...config.options, noEmit: false, declaration: true, emitDeclarationOnly: true };
  const program = ts.createProgram([SOURCE], options);
  const errors = ts.getPreEmitDiagnostics(program);
  if (errors.length) {
    const host = { getCanonicalFileName: (f) => f, getCurrentDirectory: () => here, getNewLine: () => "\n" };
    throw new Error("broker.js has type errors:\n" + ts.formatDiagnostics(errors, host));
  }
  let text = null;
  const result = program.emit(program.getSourceFile(SOURCE), (name, data) => {
    if (name.endsWith(".d.ts")) text = data;
  }, undefined, true);
  if (result.emitSkipped || text === null) throw new Error("tsc emitted no declarations");
  return text;
}

// The typedefs whose JSDoc says @internal: tsc keeps only their description in its output.
function internalTypedefs() {
  const source = ts.createSourceFile(SOURCE, readFileSync(SOURCE, "utf8"), ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);
  const names = new Set();
  for (const node of [...source.statements, source.endOfFileToken]) {
    // `jsDoc`: every JSDoc comment before the node (the end-of-file token holds the typedefs
    // at the end; getJSDocCommentsAndTags returns only the last of those).
    for (const doc of node.jsDoc || []) {
      const tags = doc.tags || [];
      if (!tags.some((tag) => tag.tagName.text === "internal")) continue;
      for (const tag of tags) if (ts.isJSDocTypedefTag(tag) && tag.name) names.add(tag.name.getText());
    }
  }
  return names;
}

function isInternal(node, typedefs) {
  const name = node.name && ts.isIdentifier(node.name) ? node.name.text : "";
  if (ts.isTypeAliasDeclaration(node)) return typedefs.has(name);
  return name.startsWith("_") || ts.getJSDocTags(node).some((tag) => tag.tagName.text === "internal");
}

function publicOnly(text) {
  const typedefs = internalTypedefs();
  const file = ts.createSourceFile("broker.d.ts", text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  // Cut the internal declarations out of the text (comments included), last first.
  const cuts = [];
  const visit = (node) => {
    if ((ts.isClassElement(node) || ts.isTypeAliasDeclaration(node)) && isInternal(node, typedefs)) {
      cuts.push([node.getFullStart(), node.getEnd()]);
      return;
    }
    ts.forEachChild(node, visit);
  };
  visit(file);
  let out = text;
  for (const [start, end] of cuts.sort((a, b) => b[0] - a[0])) out = out.slice(0, start) + out.slice(end);
  return HEADER + out.replace(/\n\s*\n/g, "\n");
}

const generated = publicOnly(emitted());
if (process.argv.includes("--check")) {
  const committed = readFileSync(TARGET, "utf8");
  if (committed !== generated) {
    const a = committed.split("\n");
    const b = generated.split("\n");
    let i = 0;
    while (i < a.length && a[i] === b[i]) i++;
    console.error(
      `broker/static/broker.d.ts is not what broker.js declares (first difference at line ${i + 1}:\n` +
        `  committed: ${JSON.stringify(a[i])}\n  generated: ${JSON.stringify(b[i])})\n` +
        "run `node tests/js/declarations.mjs` and commit the result"
    );
    process.exit(1);
  }
  console.log(JSON.stringify({ ok: true, lines: generated.split("\n").length }));
} else {
  writeFileSync(TARGET, generated);
  console.log(`wrote ${TARGET}`);
}
