--- `:checkhealth heedful`: what a developer needs for Heedful to suggest, and what is missing.

local M = {}

function M.check()
  local health = vim.health
  local heedful = require("heedful")
  local cfg = heedful.config

  health.start("Neovim")
  if vim.fn.has("nvim-0.11") == 1 then
    health.ok("Neovim " .. tostring(vim.version()))
  else
    health.error("Neovim 0.11 or newer is needed", { "Upgrade Neovim" })
  end
  if vim.lsp.inline_completion then
    health.ok("renderer: vim.lsp.inline_completion (built in) unless renderer = 'extmark'")
  else
    health.info("renderer: the plugin's extmarks (this Neovim has no vim.lsp.inline_completion)")
  end

  health.start("Server")
  local cmd = cfg.cmd or {}
  if cmd[1] and vim.fn.executable(cmd[1]) == 1 then
    health.ok(("cmd: %s"):format(table.concat(cmd, " ")))
  else
    health.error(("cmd: %q is not executable"):format(tostring(cmd[1])), {
      "Install the Heedful server, or set cmd = { '/path/to/heedful', 'serve', '--shared' } in require('heedful').setup{}",
    })
  end
  local clients = vim.lsp.get_clients({ name = "heedful" })
  if #clients == 0 then
    health.warn("no Heedful server is running", {
      "Open a file of a filetype Heedful serves (setup's filetypes; all by default)",
      "Check the server's log: add '--log-file', '/tmp/heedful.log' before 'serve' in cmd",
    })
  else
    health.ok(("%d server(s) running, attached to %d buffer(s)"):format(
      #clients,
      vim.iter(clients):fold(0, function(n, c)
        return n + vim.tbl_count(c.attached_buffers)
      end)
    ))
  end
  local s = heedful.last_status
  if not s then
    health.warn("no heedful/status from the server yet")
  elseif s.state == "ready" then
    health.ok(("engine ready: %s, adapter %s"):format(s.model or "?", s.adapter or "base model"))
  else
    health.warn(("engine %s: %s"):format(s.state, s.message or "?"), { "See the server's log" })
  end
  local learning = heedful.learning_text(s and s.learning)
  if learning then
    health.info(learning)
  end

  health.start("You")
  health.info(("developer %s, team %s"):format(cfg.developer_id, cfg.team or "none"))
  if heedful.enabled then
    health.ok("suggestions are on")
  else
    health.warn("suggestions are off", { ":HeedfulEnable" })
  end
end

return M
