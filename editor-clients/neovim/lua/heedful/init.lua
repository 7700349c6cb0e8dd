--- Heedful for Neovim: inline suggestions from `heedful serve`, and the feedback Heedful learns from.
---
--- `require("heedful").setup{...}` starts the server through `vim.lsp` for the chosen filetypes. Suggestions
--- are shown as virtual text: by `vim.lsp.inline_completion` where the running Neovim has it, by this
--- plugin's own extmarks otherwise. Whatever renders them, this module tells the server what the developer
--- did (the feedback contract in docs/language-server.md): `textDocument/didShowCompletion` when a suggestion
--- appears, the item's `heedful.acceptCompletion` command after an accept,
--- `textDocument/didPartiallyAcceptCompletion` after accepting a word, `heedful/didRejectCompletion` when a
--- suggestion is dismissed, and the `heedful.feedback` command for `:HeedfulCorrect {text}`. It also says where the
--- cursor came to rest (`heedful/didMoveCursor`), so that the server reads the text before it while you think.

local ghost = require("heedful.ghost")

local M = {}

local SHOW = "textDocument/didShowCompletion"
local PARTIAL = "textDocument/didPartiallyAcceptCompletion"
local REJECT = "heedful/didRejectCompletion"
local STATUS = "heedful/status"
local FEEDBACK = "heedful.feedback"
local INLINE = "textDocument/inlineCompletion"
local CURSOR = "heedful/didMoveCursor"

---@class heedful.Keymaps
---@field accept string|false Insert-mode key that accepts the whole suggestion (falls back to the key itself)
---@field accept_word string|false Insert-mode key that accepts the suggestion's next word
---@field dismiss string|false Insert-mode key that dismisses the suggestion (a reject)
---@field trigger string|false Insert-mode key that asks for a suggestion now

---@class heedful.Config
---@field cmd string[] How to start the server; it speaks LSP over stdio. `--shared`: one server for every
--- Neovim (and other editor) of this user, started by the first
---@field developer_id string Who is typing (initializationOptions.developerId); default $USER
---@field team string? The team whose adapter may serve you
---@field token string? Your token for a team's server (`heedful serve --connect HOST:PORT` in cmd)
---@field session_id string? Defaults to a new id per Neovim instance (chosen by the server)
---@field settings table? Per-developer settings sent as initializationOptions.settings
---@field filetypes string[]? Filetypes to attach to; nil attaches to every file with a filetype
---@field renderer "auto"|"builtin"|"extmark" "auto" uses vim.lsp.inline_completion when present
---@field debounce_ms integer Pause after typing before the extmark renderer asks for a suggestion
---@field cursor_rest_ms integer How long the cursor rests on another line before the server is told (0: never)
---@field keymaps heedful.Keymaps
---@field exit_timeout_ms integer On quit, how long Neovim waits for the server to record the session's end
local defaults = {
  cmd = { "heedful", "serve", "--shared" },
  developer_id = vim.env.USER or vim.env.USERNAME or "developer",
  team = nil,
  token = nil,
  session_id = nil,
  settings = nil,
  filetypes = nil,
  renderer = "auto",
  debounce_ms = 200,
  cursor_rest_ms = 300,
  exit_timeout_ms = 5000,
  keymaps = { accept = "<Tab>", accept_word = "<M-Right>", dismiss = "<C-]>", trigger = "<M-\\>" },
}

---@type heedful.Config
M.config = vim.deepcopy(defaults)

--- What this Neovim knows about the suggestion on screen, per buffer.
---@class heedful.Shown
---@field item table The LSP InlineCompletionItem as the server sent it
---@field client_id integer
---@field row integer 0-based row of the insertion point
---@field col integer 0-based byte column of the insertion point
---@type table<integer, heedful.Shown>
local shown = {}

---@type table? The last `heedful/status` params
M.last_status = nil
--- Whether Heedful suggests (`:HeedfulToggle`, `:HeedfulEnable`, `:HeedfulDisable`); while off the server is
--- not asked for suggestions at all.
M.enabled = true
---@type string? The id of the completion the developer saw last (what :HeedfulCorrect refers to)
M.last_completion_id = nil

local function completion_id(item)
  local args = item and item.command and item.command.arguments
  local first = args and args[1]
  if type(first) == "table" then
    return first.completionId
  end
  return first
end

---@return vim.lsp.Client?
function M.client(bufnr)
  return vim.lsp.get_clients({ bufnr = bufnr or 0, name = "heedful" })[1]
end

local function use_builtin()
  local r = M.config.renderer
  if r == "builtin" and not vim.lsp.inline_completion then
    vim.notify_once("heedful: renderer = 'builtin' needs vim.lsp.inline_completion (Neovim 0.12+); using extmarks")
  end
  return (r == "auto" or r == "builtin") and vim.lsp.inline_completion ~= nil
end

--- Record that `item` is on screen at the cursor and tell the server so.
local function note_shown(bufnr, client, item)
  local cursor = vim.api.nvim_win_get_cursor(0)
  local pos = item.range and item.range.start
  local row, col = cursor[1] - 1, cursor[2]
  if pos then
    row = pos.line
    local line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
    col = vim.str_byteindex(line, client.offset_encoding, pos.character, false)
  end
  local previous = shown[bufnr]
  if previous and completion_id(previous.item) == completion_id(item) then
    return
  end
  shown[bufnr] = { item = item, client_id = client.id, row = row, col = col }
  M.last_completion_id = completion_id(item) or M.last_completion_id
  client:notify(SHOW, { item = item })
end

--- Forget the suggestion on screen; `reject` tells the server the developer dismissed it.
local function drop(bufnr, reject)
  local s = shown[bufnr]
  shown[bufnr] = nil
  ghost.clear(bufnr)
  if s and reject then
    local client = vim.lsp.get_client_by_id(s.client_id)
    local cid = completion_id(s.item)
    if client and cid then
      client:notify(REJECT, { completionId = cid })
    end
  end
end

--- Put `text` into the buffer at the suggestion's insertion point and move the cursor after it.
local function insert(bufnr, s, text)
  local lines = vim.split(text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(bufnr, s.row, s.col, s.row, s.col, lines)
  local last_row = s.row + #lines - 1
  local last_col = (#lines == 1 and s.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { last_row + 1, last_col })
end

--- Take the suggestion off the screen to insert it (all or part): it and its client, or nil.
local function take(bufnr)
  local s = shown[bufnr]
  if not s then
    return nil, nil
  end
  shown[bufnr] = nil
  ghost.clear(bufnr)
  return s, vim.lsp.get_client_by_id(s.client_id)
end

--- Accept the whole suggestion: insert it, then run the item's command so the server records the accept.
---@return boolean accepted
function M.accept(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s, client = take(bufnr)
  if not s then
    return false
  end
  insert(bufnr, s, s.item.insertText)
  if client and s.item.command then
    client:exec_cmd(s.item.command, { bufnr = bufnr })
  end
  return true
end

--- Accept up to the end of the suggestion's next word (leading blanks included).
---@return boolean accepted
function M.accept_word(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local text = shown[bufnr] and shown[bufnr].item.insertText
  if not text then
    return false
  end
  local word = text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text
  if #word >= #text then
    return M.accept(bufnr)
  end
  local s, client = take(bufnr)
  insert(bufnr, s, word)
  if client then
    -- acceptedLength counts UTF-16 units from the start of insertText (the contract).
    client:notify(PARTIAL, { item = s.item, acceptedLength = vim.str_utfindex(text, "utf-16", #word, false) })
  end
  return true
end

--- Dismiss the suggestion on screen and tell the server it was rejected.
---@return boolean dismissed
function M.dismiss(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if not shown[bufnr] then
    return false
  end
  drop(bufnr, true)
  return true
end

--- The suggestion on screen in `bufnr`: `{completionId, text, row, col}`, or nil.
function M.current(bufnr)
  local s = shown[bufnr or vim.api.nvim_get_current_buf()]
  if not s then
    return nil
  end
  return { completionId = completion_id(s.item), text = s.item.insertText, row = s.row, col = s.col }
end

-- The extmark renderer: ask for a suggestion, draw it, and tell the server it is shown. --------------------

local timers = {}

function M.request(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local client = M.client(bufnr)
  if not client or not M.enabled then
    return
  end
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local cursor = vim.api.nvim_win_get_cursor(0)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = 2 }
  client:request(INLINE, params, function(err, result)
    if err then
      vim.notify("heedful: " .. (err.message or vim.inspect(err)), vim.log.levels.WARN)
      return
    end
    local items = result and (result.items or result)
    local item = items and items[1]
    -- Drop an answer to a question the developer has since moved on from.
    local now = vim.api.nvim_win_get_cursor(0)
    if
      not item
      or vim.api.nvim_get_current_buf() ~= bufnr
      or vim.api.nvim_buf_get_changedtick(bufnr) ~= tick
      or now[1] ~= cursor[1]
      or now[2] ~= cursor[2]
      or not vim.api.nvim_get_mode().mode:match("^i")
    then
      return
    end
    note_shown(bufnr, client, item)
    local s = shown[bufnr]
    ghost.show(bufnr, s.row, s.col, item.insertText)
  end, bufnr)
end

local function schedule_request(bufnr)
  local t = timers[bufnr]
  if t then
    t:stop()
  else
    t = assert(vim.uv.new_timer())
    timers[bufnr] = t
  end
  t:start(
    M.config.debounce_ms,
    0,
    vim.schedule_wrap(function()
      if vim.api.nvim_buf_is_valid(bufnr) and vim.api.nvim_get_current_buf() == bufnr then
        M.request(bufnr)
      end
    end)
  )
end

local function attach_extmark_renderer(bufnr)
  local group = vim.api.nvim_create_augroup("heedful.ghost." .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ "InsertEnter", "TextChangedI" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      -- Typing changes what would be inserted; the server infers a reject when the typing diverges.
      drop(bufnr, false)
      schedule_request(bufnr)
    end,
  })
  vim.api.nvim_create_autocmd("CursorMovedI", {
    group = group,
    buffer = bufnr,
    callback = function()
      local s = shown[bufnr]
      local cursor = vim.api.nvim_win_get_cursor(0)
      if s and (cursor[1] - 1 ~= s.row or cursor[2] ~= s.col) then
        drop(bufnr, true)
      end
    end,
  })
end

-- The built-in renderer: vim.lsp.inline_completion asks and draws; this module listens in. -----------------

--- Wrap the client's requests so each inline completion the built-in renderer shows is reported as shown.
local function observe_builtin(client)
  if client._heedful_observed then
    return
  end
  client._heedful_observed = true
  local request = client.request
  client.request = function(self, method, params, handler, bufnr)
    if method == INLINE and handler then
      local inner = handler
      handler = function(err, result, ctx, config)
        inner(err, result, ctx, config)
        local items = result and (result.items or result)
        if not err and items and items[1] and ctx.bufnr then
          note_shown(ctx.bufnr, self, items[1])
        end
      end
    end
    return request(self, method, params, handler, bufnr)
  end
end

local function attach_builtin_renderer(client, bufnr)
  observe_builtin(client)
  vim.lsp.inline_completion.enable(M.enabled, { bufnr = bufnr })
  local group = vim.api.nvim_create_augroup("heedful.builtin." .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd("TextChangedI", {
    group = group,
    buffer = bufnr,
    callback = function()
      shown[bufnr] = nil -- the built-in renderer asks again; the server infers rejects from the typing
    end,
  })
end

--- Take the built-in renderer's suggestion off the screen without letting it insert anything.
local function hide_builtin(bufnr)
  if use_builtin() and vim.lsp.inline_completion.is_enabled({ bufnr = bufnr }) then
    vim.lsp.inline_completion.get({ bufnr = bufnr, on_accept = function() end })
  end
end

--- What a key did before Heedful mapped it in this buffer (another plugin's mapping, or the key itself), as
--- a function for an expr mapping: the keys to type, after running a Lua mapping's callback.
local function fallback(lhs, bufnr)
  local previous = vim.api.nvim_buf_call(bufnr, function()
    return vim.fn.maparg(lhs, "i", false, true)
  end)
  if vim.tbl_isempty(previous) or (previous.desc or ""):match("^Heedful") then
    return function()
      return vim.keycode(lhs)
    end
  end
  return function()
    if previous.callback and previous.expr == 1 then
      local keys = previous.callback()
      if type(keys) ~= "string" then
        return ""
      end
      return previous.replace_keycodes == 1 and vim.keycode(keys) or keys
    elseif previous.callback then
      vim.schedule(previous.callback) -- it may edit the buffer, which an expr mapping may not
      return ""
    end
    local keys = previous.expr == 1 and vim.api.nvim_eval(previous.rhs) or previous.rhs
    keys = vim.keycode(keys)
    if previous.noremap == 1 then
      return keys
    end
    vim.schedule(function() -- typed as mapped keys, so the mapping's own mappings apply
      vim.api.nvim_feedkeys(keys, "m", false)
    end)
    return ""
  end
end

--- Insert-mode keys are expr mappings: they answer at once whether a suggestion is there (if not, the key
--- does what it did before: another plugin's mapping, or itself) and do the edit just after, since an expr
--- mapping may not change the buffer.
local function set_keymaps(bufnr)
  local keys = M.config.keymaps
  local function map(lhs, action, desc)
    if not lhs then
      return
    end
    local otherwise = fallback(lhs, bufnr)
    vim.keymap.set("i", lhs, function()
      if not shown[bufnr] then
        return otherwise()
      end
      hide_builtin(bufnr)
      vim.schedule(function()
        action(bufnr)
      end)
      return ""
    end, { buffer = bufnr, expr = true, replace_keycodes = false, desc = desc })
  end
  map(keys.accept, M.accept, "Heedful: accept the suggestion")
  map(keys.accept_word, M.accept_word, "Heedful: accept the next word of the suggestion")
  map(keys.dismiss, M.dismiss, "Heedful: dismiss the suggestion")
  if keys.trigger then
    vim.keymap.set("i", keys.trigger, function()
      M.request(bufnr)
    end, { buffer = bufnr, desc = "Heedful: ask for a suggestion now" })
  end
end

-- Where the cursor rests: the server reads the text before it while the developer thinks. -------------------

local rest_timer = nil
local told = nil -- the place last told: "bufnr:changedtick:row"

--- Tell the server the cursor rests at its place in `bufnr`, unless it was told this line of this text last.
function M.cursor_rested(bufnr)
  local client = M.client(bufnr)
  if not client or not M.enabled or vim.api.nvim_get_current_buf() ~= bufnr then
    return
  end
  local row = vim.api.nvim_win_get_cursor(0)[1]
  local place = ("%d:%d:%d"):format(bufnr, vim.api.nvim_buf_get_changedtick(bufnr), row)
  if place == told then
    return
  end
  told = place
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  client:notify(CURSOR, { textDocument = params.textDocument, position = params.position })
end

local function rest_soon(bufnr)
  rest_timer = rest_timer or assert(vim.uv.new_timer())
  rest_timer:stop()
  rest_timer:start(
    M.config.cursor_rest_ms,
    0,
    vim.schedule_wrap(function()
      if vim.api.nvim_buf_is_valid(bufnr) then
        M.cursor_rested(bufnr)
      end
    end)
  )
end

--- Once attached, and whenever the cursor comes to another line or buffer: tell the server where it rests.
local function watch_cursor(bufnr)
  if M.config.cursor_rest_ms <= 0 then
    return
  end
  local last_row = vim.api.nvim_win_get_cursor(0)[1]
  vim.api.nvim_create_autocmd({ "CursorMoved", "CursorMovedI", "BufEnter" }, {
    group = vim.api.nvim_create_augroup("heedful.cursor." .. bufnr, { clear = true }),
    buffer = bufnr,
    callback = function(ev)
      local row = vim.api.nvim_win_get_cursor(0)[1]
      if ev.event ~= "BufEnter" and row == last_row then
        return -- along a line (typing on it) the text before the cursor is what the requests read
      end
      last_row = row
      rest_soon(bufnr)
    end,
  })
  rest_soon(bufnr)
end

local function on_attach(client, bufnr)
  if use_builtin() then
    attach_builtin_renderer(client, bufnr)
  else
    attach_extmark_renderer(bufnr)
  end
  set_keymaps(bufnr)
  watch_cursor(bufnr)
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = vim.api.nvim_create_augroup("heedful.leave." .. bufnr, { clear = true }),
    buffer = bufnr,
    callback = function()
      drop(bufnr, true)
    end,
  })
end

-- Commands ------------------------------------------------------------------------------------------------

--- Send an explicit correction (`heedful.feedback`) about the last suggestion; `on_done(result, err)`.
function M.correct(text, on_done)
  local client = M.client(0) or vim.lsp.get_clients({ name = "heedful" })[1]
  if not client then
    vim.notify("heedful: no Heedful server is running for this buffer", vim.log.levels.ERROR)
    return
  end
  if not text or not text:match("%S") then
    vim.notify('heedful: say what the suggestion should have been, e.g. :HeedfulCorrect use pathlib', vim.log.levels.ERROR)
    return
  end
  local body = { text = text }
  if M.last_completion_id then
    body.completionId = M.last_completion_id
  end
  client:request("workspace/executeCommand", { command = FEEDBACK, arguments = { body } }, function(err, result)
    if err then
      vim.notify("heedful: the correction was not recorded: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
    else
      vim.notify("heedful: correction recorded", vim.log.levels.INFO)
    end
    if on_done then
      on_done(result, err)
    end
  end, 0)
end

---@type table? What `:HeedfulLearning` last answered (the server's `heedful.learning` result)
M.last_learned = nil
---@type string? The last error a learning or report command met
M.last_error = nil
---@type string? Where `:HeedfulReport` last wrote the report
M.last_report = nil

local LEARNING = "heedful.learning"
local REPORT = "heedful.report"

local function server_command(command, arguments, on_result)
  local client = M.client(0) or vim.lsp.get_clients({ name = "heedful" })[1]
  if not client then
    M.last_error = "no Heedful server is running for this buffer"
    vim.notify("heedful: " .. M.last_error, vim.log.levels.ERROR)
    return
  end
  client:request("workspace/executeCommand", { command = command, arguments = arguments }, function(err, result)
    if err then
      M.last_error = err.message or vim.inspect(err)
      vim.notify("heedful: " .. M.last_error, vim.log.levels.ERROR)
    else
      M.last_error = nil
      on_result(result)
    end
  end, 0)
end

--- What Heedful learned for you, as lines: the adapter serving you, whether training is paused, your latest
--- corrections and adapter versions.
function M.learned_lines(r)
  local function given(x) -- JSON null arrives as vim.NIL
    return x ~= vim.NIL and x or nil
  end
  local serving, paused = given(r.serving), given(r.paused)
  local lines = {
    "Serving you: " .. (serving and ("adapter " .. serving) or "the base model (no adapter of yours)"),
    "Training: " .. (paused and ("paused (" .. paused .. "), :HeedfulLearning resume") or "on (:HeedfulLearning pause)"),
    "Recording: "
      .. (
        r.recordingPaused == true and "paused, nothing of yours is stored (:HeedfulLearning resume_recording)"
        or "on (:HeedfulLearning pause_recording)"
      ),
    "Latest corrections:",
  }
  for _, c in ipairs(r.corrections or {}) do
    table.insert(lines, "  - " .. c)
  end
  table.insert(lines, "Adapter versions (:HeedfulLearning undo takes the serving one out):")
  for _, v in ipairs(r.versions or {}) do
    table.insert(lines, ("  - %s %s %s"):format(v.version, v.status, (v.createdAt or ""):sub(1, 16)))
  end
  return lines
end

--- `:HeedfulLearning [show|pause|resume|undo|pause_recording|resume_recording]`: what Heedful learned for
--- you, and your control over it.
function M.learning(action, on_done)
  action = (action and action ~= "") and action or "show"
  server_command(LEARNING, { { action = action } }, function(result)
    M.last_learned = result
    vim.notify(table.concat(M.learned_lines(result), "\n"), vim.log.levels.INFO)
    if on_done then
      on_done(result)
    end
  end)
end

--- `:HeedfulReport`: the server's report of your suggestions and adapters, written to an HTML file and opened.
function M.report(on_done)
  server_command(REPORT, {}, function(result)
    local path = vim.fn.tempname() .. "-heedful-report.html"
    vim.fn.writefile(vim.split(result.html, "\n", { plain = true }), path)
    M.last_report = path
    local opened = false
    if vim.ui.open then
      local ok, job = pcall(vim.ui.open, path)
      opened = ok and job ~= nil
    end
    vim.notify("heedful: report written to " .. path .. (opened and "" or " (open it in a browser)"))
    if on_done then
      on_done(path)
    end
  end)
end

--- What learning does for you, in a few words, from the status's `learning` object (nil: not known yet).
function M.learning_text(l)
  if type(l) ~= "table" then
    return nil
  end
  if l.state == "training" then
    return ("training step %s/%s"):format(l.step or "?", l.steps or "?")
  elseif l.state == "paused" or l.state == "off" then
    return ("learning %s: %s"):format(l.state, l.reason or "?")
  elseif l.recording == "paused" then
    return "recording paused"
  end
  return ("learning from feedback %s/%s"):format(l.feedback or 0, l.needed or "?")
end

--- Turn suggestions on or off in every buffer Heedful serves; off also takes a shown suggestion away.
function M.set_enabled(on)
  M.enabled = on
  for _, client in ipairs(vim.lsp.get_clients({ name = "heedful" })) do
    for bufnr in pairs(client.attached_buffers) do
      if use_builtin() then
        vim.lsp.inline_completion.enable(on, { bufnr = bufnr })
      end
      if not on and shown[bufnr] then
        drop(bufnr, false)
      end
    end
  end
  vim.api.nvim_exec_autocmds("User", { pattern = "HeedfulStatus", modeline = false })
end

function M.status_line()
  local s = M.last_status
  if not M.enabled then
    return "Heedful: off (:HeedfulEnable)"
  end
  if not s then
    return "Heedful: starting"
  end
  local learning = M.learning_text(s.learning)
  return ("Heedful: %s (%s, adapter %s%s)"):format(
    s.state,
    s.model or "?",
    s.adapter or "base",
    learning and (", " .. learning) or ""
  )
end

local function init_options(cfg)
  return {
    developerId = cfg.developer_id,
    team = cfg.team,
    token = cfg.token,
    sessionId = cfg.session_id,
    settings = cfg.settings,
    -- This client says where the cursor rests itself (heedful/didMoveCursor, `cursor_rest_ms`): the server then
    -- does not ask for textDocument/documentHighlight in its stead.
    cursorRest = "didMoveCursor",
  }
end

local function start(bufnr)
  local cfg = M.config
  if vim.bo[bufnr].buftype ~= "" or vim.bo[bufnr].filetype == "" then
    return
  end
  if cfg.filetypes and not vim.list_contains(cfg.filetypes, vim.bo[bufnr].filetype) then
    return
  end
  local cmd = cfg.cmd
  if vim.fn.executable(cmd[1]) ~= 1 then
    vim.notify_once(
      ("heedful: cannot start the server: %q is not executable; set cmd in require('heedful').setup{}"):format(cmd[1]),
      vim.log.levels.ERROR
    )
    return
  end
  local path = vim.api.nvim_buf_get_name(bufnr)
  vim.lsp.start({
    name = "heedful",
    cmd = cmd,
    root_dir = vim.fs.root(bufnr, { ".git" }) or vim.fs.dirname(path),
    init_options = init_options(cfg),
    flags = { exit_timeout = cfg.exit_timeout_ms },
    handlers = {
      [STATUS] = function(_, params)
        M.last_status = params
        vim.api.nvim_exec_autocmds("User", { pattern = "HeedfulStatus", modeline = false })
      end,
    },
    on_attach = on_attach,
  }, { bufnr = bufnr })
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(defaults), opts or {})
  local group = vim.api.nvim_create_augroup("heedful", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    callback = function(ev)
      start(ev.buf)
    end,
  })
  vim.api.nvim_create_user_command("HeedfulCorrect", function(cmd)
    M.correct(cmd.args)
  end, { nargs = "+", desc = "Heedful: tell the server what the last suggestion should have been" })
  vim.api.nvim_create_user_command("HeedfulStatus", function()
    vim.notify(M.status_line())
  end, { desc = "Heedful: show the engine state and the adapter serving you" })
  vim.api.nvim_create_user_command("HeedfulEnable", function()
    M.set_enabled(true)
  end, { desc = "Heedful: suggest again" })
  vim.api.nvim_create_user_command("HeedfulDisable", function()
    M.set_enabled(false)
  end, { desc = "Heedful: stop suggesting (the server is not asked)" })
  vim.api.nvim_create_user_command("HeedfulLearning", function(cmd)
    M.learning(cmd.args)
  end, {
    nargs = "?",
    complete = function()
      return { "show", "pause", "resume", "undo", "pause_recording", "resume_recording" }
    end,
    desc = "Heedful: what it learned for you; pause, resume or undo it; pause or resume recording",
  })
  vim.api.nvim_create_user_command("HeedfulReport", function()
    M.report()
  end, { desc = "Heedful: the report of your suggestions and adapters, as an HTML file" })
  vim.api.nvim_create_user_command("HeedfulToggle", function()
    M.set_enabled(not M.enabled)
    vim.notify(M.status_line())
  end, { desc = "Heedful: suggestions on or off" })
  -- Buffers already open when setup runs (e.g. `nvim file.py -c 'lua require"heedful".setup{}'`).
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) then
      start(bufnr)
    end
  end
end

return M
