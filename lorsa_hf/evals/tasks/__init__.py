"""The project's lm-eval tasks: YAML definitions read by lm-eval's TaskManager, and `lorsa_tasks.py`, which
lm-eval loads from this folder to generate their data."""
