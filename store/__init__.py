"""The trajectory store and what reads it: runs and steps in SQLite (trajectories.py), one
session per run at a time (leases.py), datasets (export.py), integrity checks (doctor.py) and
the HTML report of a run (report.py)."""
