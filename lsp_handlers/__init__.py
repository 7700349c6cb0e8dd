"""pygls handlers: document sync, inline completion, feedback capture, context building."""
