"""Sweeps (cnnlab-train -m): the parent run, the jobs' bookkeeping, the search, launchers."""
