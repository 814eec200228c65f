"""Logged models read back safely, evaluated and asked for predictions."""
