"""looprl trainer package.

Importing `rl` is cheap (no torch, no transformers), so `looprl --help` and `looprl reward` start in
well under a second. The looped Ouro model is registered with the transformers Auto classes by
`import looped` (which `rl.train`, `rl.evaluate` and `rl.model_io` do themselves); a saved `final/`
needs neither: it ships its model code (`trust_remote_code=True`).
"""

__version__ = "0.1.0"
