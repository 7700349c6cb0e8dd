--- Draws a suggestion as virtual text with extmarks, for Neovims without `vim.lsp.inline_completion`.
--- It only draws: what the suggestion is and what happens to it is `heedful`'s business.

local M = {}

M.namespace = vim.api.nvim_create_namespace("heedful.ghost")

vim.api.nvim_set_hl(0, "HeedfulSuggestion", { link = "Comment", default = true })

--- Show `text` as if inserted at (row, col), 0-based: its first line inline at the point, the rest as
--- virtual lines below.
function M.show(bufnr, row, col, text)
  M.clear(bufnr)
  local lines = vim.split(text, "\n", { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], "HeedfulSuggestion" } }
  end
  vim.api.nvim_buf_set_extmark(bufnr, M.namespace, row, col, {
    virt_text = { { lines[1], "HeedfulSuggestion" } },
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
end

function M.clear(bufnr)
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, M.namespace, 0, -1)
  end
end

return M
