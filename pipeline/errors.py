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
