"""Data: sources (sources.py, spec.py; formats.py names each format's reader in documents.py or
examples.py) -> token cache (cache.py, memory-mapped) -> rows (rows.py) -> weighted, resumable
sampler (sampler.py). Import from those modules; the data layer imports nothing above it (the
recipe schema and the stage kinds import it)."""
