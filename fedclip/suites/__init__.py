"""Experiment suites and comparison tables.

`fedclip suite --config S.yaml` runs a grid of `fedclip fit` runs (methods x settings x
seeds, `fedclip.suites.spec`) as ordinary run folders under one suite folder, resumably and
several at once (`fedclip.suites.run`, `fedclip.suites.pool`), and writes a method x
setting table of the final metric, mean ± std over seeds (`fedclip.suites.table`).
`fedclip compare RUN_DIR...` builds the same table from existing run folders
(`fedclip.suites.compare`). Nothing here imports torch at module level.
"""
