"""The embedded demo: synthetic data (data.py), the whole pipeline on it (run.py), its report (report.py)."""
