"""The error types for what a user can fix: in YAML or on the command line, in a data file, in the settings that
made training diverge, or in where outputs go."""


def excerpt(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message, cut to about `limit` characters and saying how long the whole is."""
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown):,} characters)"


def some(items: object, limit: int = 10) -> str:
    """The first `limit` of `items` for a message, and how many more there are: "3, 7, 9 and 12 more"."""
    items = [str(item) for item in items]  # type: ignore[attr-defined]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class ConfigError(ValueError):
    """A setting is wrong. The message names the setting, the expected and actual value, and the fix."""


class DataError(ValueError):
    """A data file is malformed. The message names the file, the rows, and what is wrong."""


class DivergedError(ConfigError):
    """Training produced a non-finite loss: the settings (learning rate, warm-up, clipping) need changing."""


class StorageError(ConfigError):
    """A file cannot be written where the user pointed: the disk is full, or the folder read-only."""


class ExportError(RuntimeError):
    """An exported model that does not decode as the eager model does."""
