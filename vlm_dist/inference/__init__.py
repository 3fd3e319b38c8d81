"""Using a trained export: loading and merging (export.py), generation (generate.py, vlm-generate
in generate_cli.py), evaluation (evaluation.py, vlm-eval in eval_cli.py)."""
