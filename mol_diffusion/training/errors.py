"""Errors of the training helpers."""


class ConfigError(ValueError):
    """Invalid flag, config file key or config value; its message names the value and the fix."""
