"""Recipes: the schema (schema.py, with the stage kinds' own keys from stages/), loading with
overrides (loader.py) and the value types (values.py). Import from those modules: the stage
kinds import values.py, so this package imports nothing itself."""
