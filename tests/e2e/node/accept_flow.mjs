// A second, independent LSP client for `heedful serve`: Microsoft's vscode-languageserver-protocol and
// vscode-jsonrpc (the libraries VS Code's own language client is built on) play one editor session
// over stdio: initialize, wait for `heedful/status` ready, open a file, ask for an inline completion,
// show it, insert it, run its accept command, send a correction, shutdown, exit.
//
//   node accept_flow.mjs <server command...>
//   e.g. node accept_flow.mjs .venv/bin/python -m server.cli --config heedful.toml serve
//
// On success it prints ONE JSON line on stdout:
//   {completionId, insertText, accept, feedback, exitCode, clientName, clientVersion, inlineCompletionProvider}
// and exits 0 (non-zero when the server's own exit status was not 0). Any failure: the reason on
// stderr and a non-zero exit.
//
// Environment:
//   HEEDFUL_NODE_MODULES   the node_modules directory holding the two packages. `make setup`
//                          (scripts/setup.sh) installs them with `npm ci` outside the clone, at
//                          <cache dir>/node/<first 16 hex of sha256(package-lock.json)>/node_modules;
//                          tests/e2e/test_node_client.py computes the same path and sets this variable.
//                          Unset: ./node_modules beside this file (after `npm ci` here by hand).
//   HEEDFUL_SERVER_STDERR  a file the server's stderr is appended to (default: this process's stderr).
//
// ES modules ignore NODE_PATH, so the packages are loaded with a `require` rooted in that directory.

import { spawn } from "node:child_process";
import { openSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const CLIENT_NAME = "node-vscode-languageserver-protocol";
const READY_TIMEOUT_MS = 300_000;
const REQUEST_TIMEOUT_MS = 300_000;
const EXIT_TIMEOUT_MS = 60_000;
const ACCEPT_COMMAND = "heedful.acceptCompletion";
const FEEDBACK_COMMAND = "heedful.feedback";
const FEEDBACK_TEXT = "Always add type hints";

const URI = "file:///work/shop/orders_node.py";
// The last line is an indented empty line inside the function: the cursor goes at its end.
const SOURCE = [
  '"""Small helpers for the café\'s order files ☕."""',
  "import os",
  "",
  "",
  "def read_lines(path):",
  '    """Return the lines of a text file without their line endings."""',
  "    ",
].join("\n");
const CURSOR = { line: 6, character: 4 };

/** An error whose message says it all (no stack trace in the report). */
function failure(message) {
  const error = new Error(message);
  error.expected = true;
  return error;
}

function fail(message) {
  throw failure(message);
}

function loadPackages() {
  const here = dirname(fileURLToPath(import.meta.url));
  const modules = resolve(process.env.HEEDFUL_NODE_MODULES || join(here, "node_modules"));
  // A require that resolves as if called from a file beside `modules`, i.e. it searches `modules` first.
  const require = createRequire(join(dirname(modules), "package.json"));
  let rpc, protocol;
  try {
    rpc = require("vscode-jsonrpc/node");
    protocol = require("vscode-languageserver-protocol/node");
  } catch (exc) {
    fail(`cannot load vscode-jsonrpc and vscode-languageserver-protocol from ${modules}: run \`make setup\`\n${exc}`);
  }
  // The packages' `exports` hide package.json from require; read it to report the version in use.
  const meta = JSON.parse(readFileSync(join(modules, "vscode-languageserver-protocol", "package.json"), "utf8"));
  return { rpc, protocol, version: meta.version };
}

/** `promise`, or a failure after `ms`; `what` (a string, or a function giving one) names what was awaited. */
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    const name = () => (typeof what === "function" ? what() : what);
    timer = setTimeout(() => reject(failure(`timed out after ${ms / 1000} s waiting for ${name()}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

let child = null; // the server process, killed if the flow fails midway

async function main() {
  const command = process.argv.slice(2);
  if (command.length === 0) fail("usage: node accept_flow.mjs <server command...>");
  const { rpc, protocol, version } = loadPackages();
  const {
    DidChangeTextDocumentNotification,
    DidOpenTextDocumentNotification,
    ExecuteCommandRequest,
    ExitNotification,
    InitializeRequest,
    InitializedNotification,
    InlineCompletionRequest,
    InlineCompletionTriggerKind,
    LogMessageNotification,
    ShowMessageNotification,
    ShutdownRequest,
  } = protocol;

  const stderrFile = process.env.HEEDFUL_SERVER_STDERR;
  const serverStderr = stderrFile ? openSync(stderrFile, "a") : "inherit";
  const proc = spawn(command[0], command.slice(1), { stdio: ["pipe", "pipe", serverStderr] });
  child = proc;
  let exitRequested = false;
  const exited = new Promise((resolveExit, rejectExit) => {
    proc.on("error", (exc) => rejectExit(failure(`cannot start the server ${command[0]}: ${exc.message}`)));
    proc.on("exit", (code, signal) => resolveExit(code ?? `signal ${signal}`));
  });
  // Until `exit` is sent, the server going away is a failure of whatever we are waiting for.
  const died = exited.then((status) => {
    if (!exitRequested) fail(`the server exited early with status ${status}`);
    return new Promise(() => {});
  });
  died.catch(() => {});
  const guarded = (promise, ms, what) => withTimeout(Promise.race([promise, died]), ms, what);

  const connection = rpc.createMessageConnection(
    new rpc.StreamMessageReader(proc.stdout),
    new rpc.StreamMessageWriter(proc.stdin),
  );
  const statuses = [];
  let resolveReady;
  const ready = new Promise((resolve_) => {
    resolveReady = resolve_;
  });
  connection.onNotification("heedful/status", (params) => {
    statuses.push(params);
    process.stderr.write(`heedful/status: ${JSON.stringify(params)}\n`);
    if (params?.state === "ready") resolveReady(params);
  });
  connection.onNotification(ShowMessageNotification.type, (params) => {
    process.stderr.write(`window/showMessage: ${params.message}\n`);
  });
  connection.onNotification(LogMessageNotification.type, () => {});
  // Any request from the server (registerCapability, configuration, progress): answer as an editor
  // with nothing to add would.
  connection.onRequest((method, params) => {
    if (method === "workspace/configuration") return (params?.items ?? []).map(() => null);
    return null;
  });
  connection.onError(([error]) => process.stderr.write(`connection error: ${error?.message ?? error}\n`));
  connection.listen();

  // 1. initialize / initialized, as VS Code describes itself (UTF-16 positions, inline completion).
  const init = await guarded(
    connection.sendRequest(InitializeRequest.type, {
      processId: process.pid,
      clientInfo: { name: CLIENT_NAME, version },
      locale: "en",
      rootUri: null,
      workspaceFolders: null,
      capabilities: {
        general: { positionEncodings: ["utf-16"] },
        textDocument: {
          synchronization: { dynamicRegistration: true, willSave: true, willSaveWaitUntil: true, didSave: true },
          completion: { dynamicRegistration: true, completionItem: { snippetSupport: true } },
          inlineCompletion: {},
        },
        workspace: {
          applyEdit: true,
          configuration: true,
          didChangeConfiguration: { dynamicRegistration: true },
          executeCommand: { dynamicRegistration: true },
        },
        window: { workDoneProgress: true, showMessage: {} },
      },
      initializationOptions: { developerId: "dev-node", sessionId: "session-node", team: "node" },
    }),
    REQUEST_TIMEOUT_MS,
    "the answer to initialize",
  );
  if (!init?.capabilities || typeof init.capabilities !== "object") {
    fail(`the answer to initialize has no capabilities: ${JSON.stringify(init)}`);
  }
  const caps = init.capabilities;
  // VS Code's own client only asks for inline completions when the server advertises them; this client
  // asks anyway (as the flow is the point) and reports what was advertised.
  const inlineCompletionProvider = caps.inlineCompletionProvider ?? null;
  if (!inlineCompletionProvider) {
    process.stderr.write("warning: the server does not advertise inlineCompletionProvider\n");
  }
  const commands = caps.executeCommandProvider?.commands ?? [];
  for (const name of [ACCEPT_COMMAND, FEEDBACK_COMMAND]) {
    if (!commands.includes(name)) fail(`the server does not list command ${name}: ${JSON.stringify(commands)}`);
  }
  if ((caps.positionEncoding ?? "utf-16") !== "utf-16") {
    fail(`the server chose position encoding ${caps.positionEncoding}`);
  }
  await connection.sendNotification(InitializedNotification.type, {});

  // 2. The engine is ready.
  await guarded(ready, READY_TIMEOUT_MS, () => `heedful/status {state: "ready"} (got: ${JSON.stringify(statuses)})`);

  // 3. Open a document and ask for an inline completion at the end of its last line.
  await connection.sendNotification(DidOpenTextDocumentNotification.type, {
    textDocument: { uri: URI, languageId: "python", version: 1, text: SOURCE },
  });
  const result = await guarded(
    connection.sendRequest(InlineCompletionRequest.type, {
      textDocument: { uri: URI },
      position: CURSOR,
      context: { triggerKind: InlineCompletionTriggerKind.Invoked },
    }),
    REQUEST_TIMEOUT_MS,
    "the answer to textDocument/inlineCompletion",
  );
  const items = Array.isArray(result) ? result : result?.items;
  if (!items || items.length === 0) fail(`the server answered no completion: ${JSON.stringify(result)}`);
  const item = items[0];
  const insertText = item.insertText;
  if (typeof insertText !== "string" || insertText.trim() === "") {
    fail(`the item has no insertText: ${JSON.stringify(item)}`);
  }
  const completionId = item.command?.arguments?.[0]?.completionId;
  if (item.command?.command !== ACCEPT_COMMAND || typeof completionId !== "string") {
    fail(`the item does not carry the accept command with a completionId: ${JSON.stringify(item)}`);
  }
  const range = item.range ?? { start: CURSOR, end: CURSOR };
  if (range.start.line !== CURSOR.line || range.start.character !== CURSOR.character) {
    fail(`the item's range does not start at the cursor: ${JSON.stringify(range)}`);
  }

  // 4. The editor shows it, the developer takes it: insert the text, then run the item's command.
  await connection.sendNotification("textDocument/didShowCompletion", { item });
  await connection.sendNotification(DidChangeTextDocumentNotification.type, {
    textDocument: { uri: URI, version: 2 },
    contentChanges: [{ range: { start: range.start, end: range.end }, text: insertText }],
  });
  const accept = await guarded(
    connection.sendRequest(ExecuteCommandRequest.type, {
      command: item.command.command,
      arguments: item.command.arguments,
    }),
    REQUEST_TIMEOUT_MS,
    `the answer to ${ACCEPT_COMMAND}`,
  );

  // 5. An explicit correction; it attaches to the session's latest completion.
  const feedback = await guarded(
    connection.sendRequest(ExecuteCommandRequest.type, {
      command: FEEDBACK_COMMAND,
      arguments: [{ text: FEEDBACK_TEXT }],
    }),
    REQUEST_TIMEOUT_MS,
    `the answer to ${FEEDBACK_COMMAND}`,
  );

  // 6. shutdown, exit, and the server's exit status.
  await guarded(connection.sendRequest(ShutdownRequest.type), REQUEST_TIMEOUT_MS, "the answer to shutdown");
  exitRequested = true;
  await connection.sendNotification(ExitNotification.type);
  const exitCode = await withTimeout(exited, EXIT_TIMEOUT_MS, "the server to exit after `exit`");
  connection.dispose();

  process.stdout.write(
    `${JSON.stringify({
      completionId,
      insertText,
      accept,
      feedback,
      exitCode,
      clientName: CLIENT_NAME,
      clientVersion: version,
      inlineCompletionProvider,
    })}\n`,
  );
  if (exitCode !== 0) fail(`the server exited with status ${exitCode} after shutdown/exit`);
}

main()
  .catch((exc) => {
    process.stderr.write(`accept_flow: ${exc?.expected ? exc.message : (exc?.stack ?? exc)}\n`);
    process.exitCode = 1;
  })
  .finally(() => {
    if (child !== null && child.exitCode === null && child.signalCode === null) child.kill();
    // A pending timer or the connection's streams would keep Node alive: leave now.
    process.exit(process.exitCode ?? 0);
  });
