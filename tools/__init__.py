"""Tools built on the whole of Heedful: `heedful eval` (scripted editor sessions against a real server,
`evaluation`) and `heedful report` (`report`). Only the composition root (`server.cli`, `server.serve`)
imports them; nothing they hold is on the serving or training path."""
