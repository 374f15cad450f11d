"""One error family for everything a user can get wrong.

Every message names the file or field at fault and says how to fix it; the CLI prints it
as a single line and exits with status 2.
"""


class SeptetError(Exception):
    """A user-facing error: bad input, missing file, unknown name."""


class ConfigError(SeptetError):
    """An unknown preset, or a config field with a bad value."""


class DataError(SeptetError):
    """A missing, empty or malformed corpus or dataset."""


class CheckpointError(SeptetError):
    """A missing, truncated or inconsistent checkpoint."""


class AssetError(SeptetError):
    """A registry asset that cannot be fetched or fails its checksum."""


class InputError(SeptetError, ValueError):
    """A bad argument or input to a model call: an over-long prompt, a sampling setting out
    of range. Also a ValueError, for callers that catch that."""
