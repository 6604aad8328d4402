"""The one error type for anything a user can fix in YAML or on the command line."""


class ConfigError(ValueError):
    """A setting is wrong. The message names the setting, the expected and actual value, and the fix."""


class DataError(ValueError):
    """A data file is malformed. The message names the file, the rows, and what is wrong."""
