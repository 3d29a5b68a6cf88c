"""What the command modules share: the common options (each declared once), config loading
with overrides, the store of an existing home, and how a command fails (one `error:` line on
stderr, exit 2 for bad input; `--debug` adds the traceback).

Only light modules are imported at the top (config, typer, rich): `artloop --help` loads every
command module, so anything heavy is imported inside the command that needs it."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from artloop.config import ArtloopConfig, ConfigError, ensure_home, load_config, mask_secrets
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

T = TypeVar("T")
err = Console(stderr=True, highlight=False)  # progress and errors; stdout carries the results
QUIT = object()  # an `ask` answer (see cli/execute.py): leave the session paused
_debug: ContextVar[bool] = ContextVar("artloop_debug", default=False)


# --- options -------------------------------------------------------------------------------------
# A string, not a Path: Path("") is ".", and an empty --home must be refused, not used.
HomeOpt = Annotated[
    str | None,
    typer.Option("--home", help="Home directory (env ARTLOOP_HOME; default ~/.artloop)"),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", envvar="ARTLOOP_DEBUG", help="Show an error's traceback")
]

# The config overrides that `run`, `batch` and `session new` take (each command the ones it
# offers); a flag left out (None) keeps the config's value. OVERRIDE_KEYS names the config key
# each sets, by the parameter's name.
MaxItersOpt = Annotated[int | None, typer.Option(help="Iterations at most")]
SeedOpt = Annotated[int | None, typer.Option(help="Diffusion seed")]
JudgeOpt = Annotated[
    str | None, typer.Option(help="vlm, or a reward name (e.g. darkness) that scores")
]
DiffusionModelOpt = Annotated[str | None, typer.Option(help="tiny-sd, tiny-flux, id or path")]
ChatBackendOpt = Annotated[str | None, typer.Option(help="inprocess | openai | scripted | custom")]
ChatModelOpt = Annotated[str | None, typer.Option(help="Chat model id, path or served name")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible server URL (.../v1)")]
TagOpt = Annotated[
    list[str] | None, typer.Option("--tag", help="A label stored with the run (repeat)")
]
FactScorerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fact-scorer",
        help="A scorer whose score of each image Data-CoT gets as a measured fact (repeat)",
    ),
]
WatchOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--watch",
        help="A scorer of each image and edit for the record and the report only; no agent "
        "sees it (repeat; e.g. shapes)",
    ),
]
OVERRIDE_KEYS = {
    "max_iters": "loop.max_iters",
    "judge": "loop.judge",
    "seed": "diffusion.seed",
    "diffusion_model": "diffusion.model",
    "chat_backend": "chat.backend",
    "chat_model": "chat.model",
    "base_url": "chat.base_url",
    "tag": "tags",
    "fact_scorer": "loop.fact_scorers",
    "watch": "loop.watch_scorers",
}


def overrides(**flags: Any) -> dict[str, Any]:
    """The dotted config overrides of these flags (named as in OVERRIDE_KEYS); an unset flag,
    None or an empty list, overrides nothing."""
    return {OVERRIDE_KEYS[name]: value if value != [] else None for name, value in flags.items()}


# --- failing -------------------------------------------------------------------------------------
def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit (after the traceback, with --debug)."""
    if _debug.get() and sys.exc_info()[1] is not None:
        traceback.print_exc()
    # mask_secrets: a URL's password never reaches the terminal
    err.print(f"[bold red]error:[/] {escape(mask_secrets(message))}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def failing(*errors: type[Exception]) -> Iterator[None]:
    """Bad input: an error of these types raised in the block is one line and exit 2."""
    try:
        yield
    except errors as e:
        fail(str(e))


def or_fail(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`; a StoreError (an unknown run, a file that is not a store) is one
    line and exit 2."""
    from artloop.store.trajectories import StoreError  # deliberately lazy (startup time)

    try:
        return fn(*args, **kwargs)
    except StoreError as e:
        fail(str(e))


class Commands(TyperGroup):
    """The root command: an error that escapes a command is still one line (a StoreError is bad
    input, exit 2; anything else exit 1); `--debug` (ARTLOOP_DEBUG=1) shows its traceback too."""

    def invoke(self, ctx):
        token = _debug.set(bool(ctx.params.get("debug")))
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as e:
            from artloop.store.trajectories import StoreError  # deliberately lazy (startup time)

            if isinstance(e, StoreError):
                fail(str(e))
            fail(f"{type(e).__name__}: {' '.join(str(e).split())} (--debug shows where)", code=1)
        finally:
            _debug.reset(token)
            from artloop.rewards.registry import configure_scorers  # deliberately lazy

            configure_scorers(None)  # the file's scorers section was this command's only


# --- config and store ----------------------------------------------------------------------------
def read_config(
    config: Path | None, overrides: dict[str, Any], *, create_home: bool = True
) -> ArtloopConfig:
    """The config (file, environment, then the dotted `overrides`); the home is created unless
    `create_home` is False (the read-only commands). A bad value is one line, exit 2."""
    from artloop.rewards.registry import configure_scorers  # deliberately lazy (startup time)

    with failing(ConfigError):
        cfg = load_config(config, overrides)
        if create_home:
            ensure_home(cfg.home)
    configure_scorers(cfg.scorers, cfg.chat)  # scorers.*, and vqa's chat model: the file's too
    return cfg


def existing_store(home: str | None, config: Path | None):
    """The store of an existing home, for the commands that only read it: a mistyped --home is
    an error, not a new empty home."""
    from artloop.graphs.context import open_store  # deliberately lazy (startup time)

    cfg = read_config(config, {"home": home}, create_home=False)
    return or_fail(open_store, cfg, create=False)


def quiet_libraries() -> None:
    """transformers and diffusers without their warnings and progress bars."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers  # deliberately lazy (startup time), as every torch library
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
