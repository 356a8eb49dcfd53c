"""Passes: one rule per file (match → check → rewrite → Action), run by the drivers ``fold`` and
``convert`` with the verified driver in ``base`` for function-preserving rewrites."""
