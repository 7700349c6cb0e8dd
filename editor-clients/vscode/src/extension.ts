// Heedful for VS Code: inline suggestions from `heedful serve` through vscode-languageclient (LSP 3.18
// textDocument/inlineCompletion), and the feedback Heedful learns from.
//
// The language client asks for suggestions and runs an accepted item's command (`heedful.acceptCompletion`,
// which records the accept). VS Code's stable API says neither when a suggestion is on screen nor when it is
// dismissed, so this extension infers "shown" (the answer arrived for the place the cursor still is, and
// VS Code reports an inline suggestion visible there) and owns the keys that dismiss a suggestion or take
// one word of it, sending textDocument/didShowCompletion, heedful/didRejectCompletion and
// textDocument/didPartiallyAcceptCompletion. Typing past a suggestion is noticed by the server itself. Once the
// cursor rests on another line (or in another document) for `heedful.cursorRestMs`, it sends
// heedful/didMoveCursor: the server reads the text before that place while the developer thinks.

import * as os from "os";
import * as vscode from "vscode";
import {
  ExecuteCommandRequest,
  type InlineCompletionItem as LspInlineCompletionItem,
  LanguageClient,
  type LanguageClientOptions,
  type ServerOptions,
  State,
} from "vscode-languageclient/node";

const SHOW = "textDocument/didShowCompletion";
const PARTIAL = "textDocument/didPartiallyAcceptCompletion";
const REJECT = "heedful/didRejectCompletion";
const CURSOR = "heedful/didMoveCursor";
const STATUS = "heedful/status";
const ACCEPT_COMMAND = "heedful.acceptCompletion";
const FEEDBACK_COMMAND = "heedful.feedback";
const LEARNING_COMMAND = "heedful.learning";
const REPORT_COMMAND = "heedful.report";

/** What `heedful.learning` answers: what Heedful learned for this developer. */
interface Learned {
  developerId: string;
  paused: string | null;
  recordingPaused: boolean;
  serving: string | null;
  corrections: string[];
  versions: { version: string; status: string; createdAt: string; kl: number | null; reason: string | null }[];
}
const ACCEPTED = "heedful.accepted"; // the local wrapper around an item's accept command
const SHOWN_CONTEXT = "heedful.suggestionShown";
const SNOOZE_MS = 30 * 60 * 1000;
// Settings whose change needs a new server process; the others apply at once.
const RESTART_SETTINGS = [
  "heedful.serverCommand",
  "heedful.token",
  "heedful.developerId",
  "heedful.team",
  "heedful.documentSelector",
];

/** Whether `heedful.enable` lets Heedful suggest in `language`: its own entry, else `*`, else yes. */
export function enabledFor(enable: unknown, language: string): boolean {
  if (typeof enable !== "object" || enable === null) {
    return true;
  }
  const table = enable as Record<string, unknown>;
  const own = table[language];
  if (typeof own === "boolean") {
    return own;
  }
  return typeof table["*"] === "boolean" ? (table["*"] as boolean) : true;
}

interface Status {
  state: string;
  message: string | null;
  engine: string | null;
  model: string | null;
  adapter: string | null;
  developerId: string;
  sessionId: string;
  learning?: Learning | null;
}

/** What learning does for this developer (the status's `learning` object). */
interface Learning {
  state: "collecting" | "training" | "paused" | "off";
  trainer?: "in-server" | "worker";
  feedback?: number;
  needed?: number;
  phase?: string;
  step?: number;
  steps?: number;
  reason?: string;
  recording?: "paused";
  lastRound?: { status: string; reason: string | null; version: string | null; finishedAt: string | null };
}

/** Learning in a few words: "training 5/24", "learning 7/16", "learning paused". */
function learningShort(l: Learning | null | undefined): string | undefined {
  if (!l) {
    return undefined;
  }
  if (l.state === "training") {
    return `training ${l.step ?? "?"}/${l.steps ?? "?"}`;
  }
  if (l.state === "collecting" && l.recording === "paused") {
    return "recording paused";
  }
  return l.state === "collecting" ? `learning ${l.feedback ?? 0}/${l.needed ?? "?"}` : `learning ${l.state}`;
}

/** Learning in a sentence, for the tooltip and the status message. */
function learningLong(l: Learning | null | undefined): string {
  if (!l) {
    return "Learning: not known yet";
  }
  const who = l.trainer === "worker" ? "a separate training worker" : "this server";
  const now =
    l.state === "training"
      ? `training a round on ${who} (${l.phase ?? "?"}, step ${l.step ?? "?"} of ${l.steps ?? "?"})`
      : l.state === "collecting"
        ? `${l.feedback ?? 0} of ${l.needed ?? "?"} feedback turns for the next round (${who} trains)`
        : `${l.state}: ${l.reason ?? "?"}`;
  const last = l.lastRound
    ? `; last round ${l.lastRound.status}${l.lastRound.version ? ` (${l.lastRound.version})` : ""}` +
      (l.lastRound.reason ? `: ${l.lastRound.reason}` : "")
    : "";
  return `Learning: ${now}${last}`;
}

/** A suggestion the server served, as the server sent it, and where it applies. */
interface Served {
  item: LspInlineCompletionItem;
  completionId: string;
  uri: string;
  position: vscode.Position;
  version: number;
}

class Heedful {
  client: LanguageClient | undefined;
  status: Status | undefined;
  shown: Served | undefined; // on screen now, not yet accepted or dismissed
  lastShownId: string | undefined; // what "Correct last suggestion" refers to
  reportPanel: vscode.WebviewPanel | undefined;
  snoozedUntil = 0; // epoch ms; suggestions stay off until then
  private snoozeTimer: ReturnType<typeof setTimeout> | undefined;
  private selector: { scheme: string; language: string }[] = [];
  private restTimer: ReturnType<typeof setTimeout> | undefined;
  private cursorLine: string | undefined; // "uri:line" the cursor was last on
  private toldPlace: string | undefined; // "uri:version:line" the server was last told the cursor rests at
  readonly statusBar = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  readonly output = vscode.window.createOutputChannel("Heedful", { log: true });

  constructor() {
    this.statusBar.command = "heedful.showMenu";
    this.renderStatus();
    this.statusBar.show();
  }

  // -- on, off, snoozed ------------------------------------------------------------------------------------

  get snoozed(): boolean {
    return Date.now() < this.snoozedUntil;
  }

  /** Whether a suggestion may be asked for in `document` now. */
  suggestsIn(document: vscode.TextDocument): boolean {
    return !this.snoozed && enabledFor(vscode.workspace.getConfiguration("heedful").get("enable"), document.languageId);
  }

  async setEnabled(language: string, enabled: boolean): Promise<void> {
    const config = vscode.workspace.getConfiguration("heedful");
    const table = { ...(config.get<Record<string, boolean>>("enable") ?? { "*": true }) };
    table[language] = enabled;
    await config.update("enable", table, vscode.ConfigurationTarget.Global);
    this.renderStatus();
  }

  snooze(ms: number = SNOOZE_MS): void {
    this.snoozedUntil = Date.now() + ms;
    clearTimeout(this.snoozeTimer);
    this.snoozeTimer = setTimeout(() => this.resume(), ms);
    void vscode.commands.executeCommand("editor.action.inlineSuggest.hide");
    this.renderStatus();
  }

  resume(): void {
    this.snoozedUntil = 0;
    clearTimeout(this.snoozeTimer);
    this.renderStatus();
  }

  /** The status bar's menu: switch suggestions, and everything else Heedful offers. */
  async showMenu(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    const language = editor?.document.languageId;
    const enable = vscode.workspace.getConfiguration("heedful").get("enable");
    type Choice = vscode.QuickPickItem & { run: () => unknown };
    const choices: Choice[] = [];
    if (enabledFor(enable, "*")) {
      choices.push({ label: "Disable suggestions", description: "everywhere", run: () => this.setEnabled("*", false) });
    } else {
      choices.push({ label: "Enable suggestions", description: "everywhere", run: () => this.setEnabled("*", true) });
    }
    if (language) {
      const on = enabledFor(enable, language);
      choices.push({
        label: `${on ? "Disable" : "Enable"} suggestions for ${language}`,
        run: () => this.setEnabled(language, !on),
      });
    }
    choices.push(
      this.snoozed
        ? { label: "Resume suggestions", description: `snoozed until ${clock(this.snoozedUntil)}`, run: () => this.resume() }
        : { label: "Snooze suggestions for 30 minutes", run: () => this.snooze() },
      { label: "Correct last suggestion", run: () => this.correct() },
      { label: "Show status", run: () => this.showStatus() },
      { label: "What Heedful learned", run: () => this.showLearned() },
      { label: "Open report", run: () => this.openReport() },
      { label: "Show log", run: () => this.output.show() },
    );
    const picked = await vscode.window.showQuickPick(choices, { title: "Heedful", placeHolder: this.statusBar.text });
    await picked?.run();
  }

  async start(): Promise<void> {
    const config = vscode.workspace.getConfiguration("heedful");
    const command = config.get<string[]>("serverCommand", ["heedful", "serve", "--shared"]);
    if (!Array.isArray(command) || command.length === 0 || command.some((part) => typeof part !== "string")) {
      this.fail(
        `heedful.serverCommand must be a list of strings like ["heedful", "serve", "--shared"], not ${JSON.stringify(command)}`,
      );
      return;
    }
    // No `transport`: the client would append `--stdio`, which `heedful serve` does not take (stdio is its default).
    const server: ServerOptions = { command: command[0], args: command.slice(1) };
    const languages = config.get<string[]>("documentSelector", ["*"]);
    this.selector = languages.flatMap((language) => [
      { scheme: "file", language },
      { scheme: "untitled", language },
    ]);
    const options: LanguageClientOptions = {
      documentSelector: this.selector,
      initializationOptions: {
        developerId: config.get<string>("developerId") || os.userInfo().username,
        team: config.get<string>("team") || undefined,
        token: config.get<string>("token") || undefined,
        // This client says where the cursor rests itself (heedful/didMoveCursor, `heedful.cursorRestMs`): the
        // server then does not ask for textDocument/documentHighlight in its stead (VS Code would give up its own
        // word highlighting in files no other extension highlights).
        cursorRest: "didMoveCursor",
      },
      outputChannel: this.output,
      middleware: {
        // The server also answers textDocument/completion for editors without inline completion; here its
        // items would duplicate the ghost text in the suggest widget and take Tab from it.
        provideCompletionItem: () => undefined,
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          if (!this.suggestsIn(document)) {
            return undefined; // off here, or snoozed: the server is not even asked
          }
          const result = await next(document, position, context, token);
          const items = Array.isArray(result) ? result : (result?.items ?? []);
          items.forEach((item) => this.wrapAccept(item, document, position));
          if (items.length > 0 && !token.isCancellationRequested) {
            this.noteShownSoon(items[0], document, position);
          }
          return result;
        },
      },
    };
    this.client = new LanguageClient("heedful", "Heedful", server, options);
    this.client.onDidChangeState((event) => {
      if (event.newState === State.Stopped) {
        this.status = undefined;
        this.renderStatus("stopped");
      }
    });
    this.client.onNotification(STATUS, (params: Status) => {
      this.status = params;
      this.renderStatus();
    });
    try {
      await this.client.start();
    } catch (error) {
      this.fail(
        `could not start the server with ${JSON.stringify(command)}: ${String(error)}. ` +
          "Set heedful.serverCommand to the full path of `heedful` (and `serve`).",
      );
    }
  }

  /** The cursor moved in `editor`: once it rests on another line or in another document, tell the server. */
  cursorMoved(editor: vscode.TextEditor | undefined): void {
    const rest = vscode.workspace.getConfiguration("heedful").get<number>("cursorRestMs", 300);
    if (!editor || !(rest > 0)) {
      return;
    }
    const line = `${editor.document.uri.toString()}:${editor.selection.active.line}`;
    if (line === this.cursorLine) {
      return; // along a line (typing on it) the text before the cursor is what the requests read
    }
    this.cursorLine = line;
    clearTimeout(this.restTimer);
    this.restTimer = setTimeout(() => this.cursorRested(), rest);
  }

  /** heedful/didMoveCursor for where the active editor's cursor is, unless the server was told that place last. */
  cursorRested(): void {
    const editor = vscode.window.activeTextEditor;
    const client = this.client;
    if (!editor || !client?.isRunning() || !this.suggestsIn(editor.document)) {
      return;
    }
    const document = editor.document;
    if (vscode.languages.match(this.selector, document) === 0) {
      return; // a document the server is not told about
    }
    const position = editor.selection.active;
    const place = `${document.uri.toString()}:${document.version}:${position.line}`;
    if (place === this.toldPlace) {
      return;
    }
    this.toldPlace = place;
    void client.sendNotification(CURSOR, {
      textDocument: { uri: client.code2ProtocolConverter.asUri(document.uri) },
      position: { line: position.line, character: position.character },
    });
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client) {
      await client.stop();
    }
  }

  fail(message: string): void {
    this.output.error(message);
    this.renderStatus("failed");
    void vscode.window.showErrorMessage(`Heedful: ${message}`);
  }

  renderStatus(override?: string): void {
    const s = this.status;
    const editor = vscode.window.activeTextEditor;
    const off = !enabledFor(vscode.workspace.getConfiguration("heedful").get("enable"), editor?.document.languageId ?? "*");
    const state =
      override ??
      (this.snoozed ? `snoozed until ${clock(this.snoozedUntil)}` : off ? "off" : undefined) ??
      s?.state ??
      "starting";
    const adapter = s?.adapter ?? "base model";
    // The adapter serving this developer is what changes as Heedful learns: it is on the bar, not only the tooltip.
    const learning = learningShort(s?.learning);
    this.statusBar.text =
      `$(sparkle) Heedful: ${state}` + (s?.adapter ? ` · ${s.adapter}` : "") + (learning ? ` · ${learning}` : "");
    this.statusBar.tooltip = s
      ? `Engine ${s.state}${s.message ? ` (${s.message})` : ""}\nModel: ${s.model}\nAdapter serving you: ${adapter}\n` +
        `${learningLong(s.learning)}\nDeveloper: ${s.developerId}, session ${s.sessionId}`
      : `Heedful is ${state}`;
  }

  // -- what the developer does with a suggestion -----------------------------------------------------------

  /** The LSP item behind a VS Code item, rebuilt as the server sent it (the server reads its command). */
  lspItem(item: vscode.InlineCompletionItem, command: vscode.Command): LspInlineCompletionItem {
    const client = this.client!;
    return {
      insertText: typeof item.insertText === "string" ? item.insertText : item.insertText.value,
      range: item.range ? client.code2ProtocolConverter.asRange(item.range) : undefined,
      command: { title: command.title, command: command.command, arguments: command.arguments },
    };
  }

  /** Route the item's accept command through ACCEPTED so this extension knows it was taken. */
  wrapAccept(item: vscode.InlineCompletionItem, document: vscode.TextDocument, position: vscode.Position): void {
    const command = item.command;
    if (!command || command.command !== ACCEPT_COMMAND) {
      return;
    }
    const served: Served = {
      item: this.lspItem(item, command),
      completionId: completionIdOf(command),
      uri: document.uri.toString(),
      position,
      version: document.version,
    };
    item.command = { title: command.title, command: ACCEPTED, arguments: [served, command] };
  }

  noteShownSoon(item: vscode.InlineCompletionItem, document: vscode.TextDocument, position: vscode.Position): void {
    const command = item.command;
    if (!command || command.command !== ACCEPTED) {
      return;
    }
    const served = command.arguments![0] as Served;
    // VS Code draws the answer once the provider returns; it is on screen if the cursor and text still match.
    setTimeout(() => {
      const editor = vscode.window.activeTextEditor;
      if (
        !editor ||
        editor.document.uri.toString() !== served.uri ||
        editor.document.version !== document.version ||
        !editor.selection.active.isEqual(position)
      ) {
        return;
      }
      if (this.shown?.completionId === served.completionId) {
        return;
      }
      this.shown = served;
      this.lastShownId = served.completionId;
      void vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, true);
      void this.client?.sendNotification(SHOW, { item: served.item });
    }, 50);
  }

  forgetShown(): void {
    this.shown = undefined;
    void vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, false);
  }

  async accepted(served: Served, command: vscode.Command): Promise<void> {
    if (this.shown?.completionId === served.completionId) {
      this.forgetShown();
    }
    this.lastShownId = served.completionId;
    // The language client registered the server's command: it sends workspace/executeCommand.
    await vscode.commands.executeCommand(command.command, ...(command.arguments ?? []));
  }

  async dismiss(): Promise<void> {
    const served = this.shown;
    this.forgetShown();
    await vscode.commands.executeCommand("editor.action.inlineSuggest.hide");
    if (served && this.client) {
      await this.client.sendNotification(REJECT, { completionId: served.completionId });
    }
  }

  async acceptNextWord(): Promise<void> {
    const served = this.shown;
    const editor = vscode.window.activeTextEditor;
    await vscode.commands.executeCommand("editor.action.inlineSuggest.acceptNextWord");
    if (!served || !editor || !this.client || editor.document.uri.toString() !== served.uri) {
      return;
    }
    // What VS Code inserted runs from the suggestion's start to the cursor; JavaScript lengths are UTF-16
    // units, which is what acceptedLength counts.
    const taken = editor.document.getText(new vscode.Range(served.position, editor.selection.active));
    if (!served.item.insertText.toString().startsWith(taken) || taken.length === 0) {
      return;
    }
    await this.client.sendNotification(PARTIAL, { item: served.item, acceptedLength: taken.length });
    if (taken.length >= served.item.insertText.toString().length) {
      this.forgetShown();
    }
  }

  async correct(): Promise<void> {
    if (!this.client || !this.client.isRunning()) {
      void vscode.window.showErrorMessage("Heedful: the server is not running; see the Heedful output channel.");
      return;
    }
    const text = await vscode.window.showInputBox({
      title: "Heedful: Correct last suggestion",
      prompt: "What should the last suggestion have been, or what rule did it break?",
      placeHolder: "e.g. Always add type hints",
      ignoreFocusOut: true,
    });
    if (!text || !text.trim()) {
      return;
    }
    const body: { text: string; completionId?: string } = { text };
    if (this.lastShownId) {
      body.completionId = this.lastShownId;
    }
    try {
      await this.client.sendRequest(ExecuteCommandRequest.type, { command: FEEDBACK_COMMAND, arguments: [body] });
      vscode.window.setStatusBarMessage("Heedful: correction recorded", 4000);
    } catch (error) {
      void vscode.window.showErrorMessage(`Heedful: the correction was not recorded: ${String(error)}`);
    }
  }

  async showStatus(): Promise<void> {
    const s = this.status;
    const text = s
      ? `Heedful: engine ${s.state}${s.message ? ` (${s.message})` : ""}; adapter serving you: ${s.adapter ?? "base model"}. ` +
        learningLong(s.learning)
      : "Heedful: no status from the server yet";
    const choice = await vscode.window.showInformationMessage(text, "Open report", "Show log");
    if (choice === "Open report") {
      await this.openReport();
    } else if (choice === "Show log") {
      this.output.show();
    }
  }

  /** Ask the server; a failure is shown to the developer and answers undefined. */
  async serverCommand<T>(command: string, args: unknown[], failed: string): Promise<T | undefined> {
    if (!this.client) {
      void vscode.window.showErrorMessage(`Heedful: ${failed}: the server is not running (see "Show log").`);
      return undefined;
    }
    try {
      return (await this.client.sendRequest(ExecuteCommandRequest.type, { command, arguments: args })) as T;
    } catch (error) {
      void vscode.window.showErrorMessage(`Heedful: ${failed}: ${error instanceof Error ? error.message : String(error)}`);
      return undefined;
    }
  }

  /** `heedful report` for this developer, from the server, in a panel (no scripts run in it). */
  async openReport(): Promise<void> {
    const report = await this.serverCommand<{ html: string }>(REPORT_COMMAND, [], "the report could not be made");
    if (!report) {
      return;
    }
    if (!this.reportPanel) {
      this.reportPanel = vscode.window.createWebviewPanel("heedful.report", "Heedful report", vscode.ViewColumn.Active, {
        enableScripts: false,
      });
      this.reportPanel.onDidDispose(() => (this.reportPanel = undefined));
    }
    this.reportPanel.webview.html = report.html;
    this.reportPanel.reveal();
  }

  /** pause, resume, undo, or pause/resume recording; says what it did. */
  async learning(action: "pause" | "resume" | "undo" | "pause_recording" | "resume_recording"): Promise<void> {
    const done = await this.serverCommand<Learned>(LEARNING_COMMAND, [{ action }], `${action} did not happen`);
    if (!done) {
      return;
    }
    const said = {
      pause: `learning paused: ${done.paused ?? "paused"}; the adapter serving you stays`,
      resume: "learning resumed",
      undo: `undone: now serving you ${done.serving ?? "the base model"}`,
      pause_recording: "recording paused: suggestions go on, nothing of yours is stored",
      resume_recording: "recording resumed",
    }[action];
    vscode.window.setStatusBarMessage(`Heedful: ${said}`, 6000);
  }

  /** What Heedful learned for this developer, with pause, resume and undo. */
  async showLearned(): Promise<void> {
    const learned = await this.serverCommand<Learned>(LEARNING_COMMAND, [{ action: "show" }], "what it learned is not known");
    if (!learned) {
      return;
    }
    type Choice = vscode.QuickPickItem & { run?: () => unknown };
    const items: Choice[] = [
      { label: "Serving you", kind: vscode.QuickPickItemKind.Separator },
      { label: learned.serving ? `adapter ${learned.serving}` : "the base model (no adapter of yours)" },
      { label: learned.paused ? `Training paused: ${learned.paused}` : "Training on: your feedback trains your adapter" },
      learned.paused
        ? { label: "$(debug-start) Resume learning", run: () => this.learning("resume") }
        : { label: "$(debug-pause) Pause learning", run: () => this.learning("pause") },
    ];
    if (learned.serving) {
      items.push({ label: "$(discard) Undo the adapter serving you", run: () => this.learning("undo") });
    }
    items.push(
      learned.recordingPaused
        ? { label: "$(record) Resume recording (nothing of yours is stored now)", run: () => this.learning("resume_recording") }
        : { label: "$(circle-slash) Pause recording", run: () => this.learning("pause_recording") },
    );
    items.push({ label: "Your latest corrections", kind: vscode.QuickPickItemKind.Separator });
    items.push(...(learned.corrections.length ? learned.corrections : ["none yet"]).map((c) => ({ label: c })));
    items.push({ label: "Your adapter versions", kind: vscode.QuickPickItemKind.Separator });
    items.push(
      ...(learned.versions.length
        ? learned.versions.map((v) => ({
            label: `${v.version} ${v.status}`,
            description: `${v.createdAt.slice(0, 16).replace("T", " ")}${v.kl !== null ? `, KL ${v.kl.toFixed(3)}` : ""}`,
            detail: v.reason ?? undefined,
          }))
        : [{ label: "none yet" }]),
    );
    const picked = await vscode.window.showQuickPick(items, { title: "What Heedful learned", matchOnDescription: true });
    await picked?.run?.();
  }
}

function clock(epochMs: number): string {
  return new Date(epochMs).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function completionIdOf(command: vscode.Command): string {
  const first = command.arguments?.[0] as { completionId?: unknown } | string | undefined;
  if (typeof first === "string") {
    return first;
  }
  return typeof first?.completionId === "string" ? first.completionId : "";
}

let heedful: Heedful | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const h = new Heedful();
  heedful = h;
  context.subscriptions.push(
    h.statusBar,
    h.output,
    vscode.commands.registerCommand(ACCEPTED, (served: Served, command: vscode.Command) => h.accepted(served, command)),
    vscode.commands.registerCommand("heedful.dismissSuggestion", () => h.dismiss()),
    vscode.commands.registerCommand("heedful.acceptNextWord", () => h.acceptNextWord()),
    vscode.commands.registerCommand("heedful.correctLastSuggestion", () => h.correct()),
    vscode.commands.registerCommand("heedful.showStatus", () => h.showStatus()),
    vscode.commands.registerCommand("heedful.openReport", () => h.openReport()),
    vscode.commands.registerCommand("heedful.showLearned", () => h.showLearned()),
    vscode.commands.registerCommand("heedful.pauseLearning", () => h.learning("pause")),
    vscode.commands.registerCommand("heedful.resumeLearning", () => h.learning("resume")),
    vscode.commands.registerCommand("heedful.undoAdapter", () => h.learning("undo")),
    vscode.commands.registerCommand("heedful.pauseRecording", () => h.learning("pause_recording")),
    vscode.commands.registerCommand("heedful.resumeRecording", () => h.learning("resume_recording")),
    vscode.commands.registerCommand("heedful.showMenu", () => h.showMenu()),
    vscode.commands.registerCommand("heedful.enable", () => h.setEnabled("*", true)),
    vscode.commands.registerCommand("heedful.disable", () => h.setEnabled("*", false)),
    vscode.commands.registerCommand("heedful.toggleLanguage", async () => {
      const language = vscode.window.activeTextEditor?.document.languageId;
      if (!language) {
        void vscode.window.showInformationMessage("Heedful: open a file to switch suggestions for its language.");
        return;
      }
      await h.setEnabled(language, !enabledFor(vscode.workspace.getConfiguration("heedful").get("enable"), language));
    }),
    vscode.commands.registerCommand("heedful.snooze", () => h.snooze()),
    vscode.commands.registerCommand("heedful.resume", () => h.resume()),
    vscode.window.onDidChangeActiveTextEditor((editor) => {
      h.renderStatus();
      h.cursorMoved(editor);
    }),
    vscode.window.onDidChangeTextEditorSelection((event) => h.cursorMoved(event.textEditor)),
    vscode.workspace.onDidChangeTextDocument((event) => {
      // Any edit at the suggestion's place moves on from it; the server judges typing past it.
      if (h.shown && event.document.uri.toString() === h.shown.uri && event.contentChanges.length > 0) {
        h.forgetShown();
      }
    }),
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      if (RESTART_SETTINGS.some((name) => event.affectsConfiguration(name))) {
        await h.stop();
        await h.start();
      } else if (event.affectsConfiguration("heedful")) {
        h.renderStatus(); // heedful.enable: the next request reads it
      }
    }),
  );
  await h.start();
  h.cursorMoved(vscode.window.activeTextEditor);
}

export async function deactivate(): Promise<void> {
  await heedful?.stop();
}
