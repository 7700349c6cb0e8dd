"""The kernel every other package of Heedful builds on: where files live (`paths`), what an admin can set
(`settings`), how a code model is asked to fill in the middle (`fim`), durable files (`files`) and
percentiles (`stats`). It imports nothing of Heedful, so storage, the engine, learning and the language
server can all depend on it without depending on each other (`tests/unit/test_import_contracts.py`)."""
