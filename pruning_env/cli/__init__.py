"""Command lines, generated from config dataclasses (``--help`` documents every flag)."""
