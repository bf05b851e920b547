"""Benchmarks of transformers-vhead against bare transformers (and TRL 1.12 when installed): `python -m benchmarks.run`.

`workload` holds the sizes (no torch import, so the runner stays light), `cases` builds what each row measures,
`measure` is the fresh child process that times one case and counts its peak memory, `report` turns the results into
the table with targets, and `run` orchestrates.
"""
