"""User-facing errors: each message names the file or field and the fix. The CLI prints them without a traceback."""


class PipelineError(Exception):
    """An error the user can fix; the CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2


class ConfigError(PipelineError):
    pass


class DataError(PipelineError):
    pass


class ModelError(PipelineError):
    pass


class PlanError(PipelineError):
    pass


class StoreError(PipelineError):
    """The store cannot be used as it is (damaged refs for gc, read-only, a folder where a file belongs)."""


class DamagedObject(StoreError):
    """A stored object's bytes no longer match its name: it was dropped, and the next run re-makes it."""


class CorruptArray(PipelineError):
    """A pool array is missing or does not match its digest: it was dropped; running again re-makes it."""

    exit_code = 1


class LockHeld(PipelineError):
    """Another process holds the store lock (and the caller chose not to wait)."""

    exit_code = 1
