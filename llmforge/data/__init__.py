"""Data: sources (sources.py, formats.py, examples.py) -> token cache (cache.py, memory-mapped)
-> rows (rows.py) -> weighted, resumable sampler (sampler.py). Import from those modules: the
stage kinds import rows.py, and the cache imports the recipe schema, which imports the kinds."""
