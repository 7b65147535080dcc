"""What the command line's commands share: the common options, and turning user-fixable errors into messages."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import typer

from core import dist
from core.errors import PipelineError

ConfigOpt = typer.Option(Path("pipeline.toml"), "--config", "-c", help="The config file.")
SetOpt = typer.Option(
    [], "--set", "-s", metavar="KEY=VALUE", help="Override a config key: --set lora1.lr=5e-5 (repeatable)."
)
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")


def user_errors(fn):
    """Turn user-fixable errors into `error: ...` on stderr and a non-zero exit, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:  # `pipeline ... | head`: the reader left; end quietly, like any CLI tool
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            raise typer.Exit(141) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                typer.echo(
                    f"error: the disk is full ({e.filename or 'while writing'}). Free some space and run the "
                    f"same command again: finished items are kept and nothing partial is trusted.",
                    err=True,
                )
                raise typer.Exit(1) from None
            where = f" ({e.filename})" if e.filename else ""
            typer.echo(f"error: {e.strerror or e}{where}. Check that path, then run the same command again.", err=True)
            raise typer.Exit(1) from None
        except RuntimeError as e:
            failure = dist.peer_failure(e)  # another process of the run died inside a library's collective
            if failure is None:
                raise
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(failure.exit_code) from None
        except KeyboardInterrupt as e:
            typer.echo("interrupted: finished items are kept; run the same command again to resume.", err=True)
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), handled like Ctrl-C: the stage stops where it is."""


def on_sigterm(signum, frame) -> None:
    """Stop the command where it is, once: a second SIGTERM (a launcher stopping every process of a run whose peer
    failed) must not raise again inside the first one's clean-up."""
    quiet_exit()
    raise Terminated()


def quiet_exit() -> None:
    """Ignore SIGTERM from now on: the command is stopping or has ended, and a SIGTERM now (the launcher stopping
    the run's processes while this one runs its exit hooks) must leave it to exit with its own code, rather than
    raise in the interpreter's clean-up."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
