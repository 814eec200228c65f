"""The config: the typed schema (each option's type, default and range), composing it with
Hydra, and validating it."""
