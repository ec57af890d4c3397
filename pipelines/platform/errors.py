"""Errors every job reports the same way: one readable line, exit code 2, before any cluster work."""


class ConfigError(ValueError):
    """A wrong flag, path or model, reported in one line before any cluster work."""
