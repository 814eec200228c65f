"""The console scripts: argument parsing, the one-line errors, and each command's main."""
