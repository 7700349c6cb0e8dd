"""The adapter lifecycle: what happens to a trained LoRA adapter from its publishing to its deletion.

One module, :mod:`adapters.lifecycle`, with one entry point per step: publish (a crash-safe versioned
folder with its manifest, activated or rejected in one transaction), verify (what serving runs before it
routes to or loads a version), roll back, prune, and the audit entry each of them writes. It builds on the
kernel, the store and the engine's adapter-folder check; learning (which publishes), the composition root
(which serves, guards and rolls back) and the language server (whose developer undoes from the editor)
use it.
"""
