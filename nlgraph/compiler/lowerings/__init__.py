"""The lowerings: how each planned level runs (docs/compiler.md, "Layout").

One module per lowering, called by the generated program through the learner:

- :mod:`.memory` — a fast memory over a whole sequence: ``linear_memory``, ``deep_memory`` and
  ``attention`` as one kernel call each, ``reference_loop`` levels through :mod:`.reference_loop`;
- :mod:`.reference_loop` — the plain token-by-token interpreter of a memory's spec;
- :mod:`.cluster` — memories that read each other (self-modifying Titans), window by window;
- :mod:`.boundary` — CMS blocks: per-sample parameters, the pieces of a sequence, the update at
  each chunk boundary.

Leaf modules shared by them: :mod:`._scalars` (rule scalars), :mod:`._state` (heads, truncation),
:mod:`.rules` (one application of a rule chain), :mod:`.mlp` (the MLP memory's forward). Imports
only go from the lowerings above to these leaves, never back.
"""
