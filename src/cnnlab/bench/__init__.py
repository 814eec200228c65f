"""cnnlab-bench: timed sections that print figures."""
