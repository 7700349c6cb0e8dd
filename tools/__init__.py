"""Tools built on the whole of Heedful: `heedful eval` (scripted editor sessions against a real server,
`evaluation`), `heedful report` (`report`) and `heedful replay` (a recorded session against a fresh
server, `replay`). Only the composition root (`server.cli`, `server.serve`) imports them; nothing they
hold is on the serving or training path."""
