"""The one exception every config check raises."""

__all__ = ['ConfigError']


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field and the value."""
