"""`loraredux`: advise, fine-tune, inspect and merge adapters from the command line. Uses only the public API.

One module per subcommand family: `advise.py` (advise), `train.py` (train), `adapters.py` (inspect, merge,
methods), `bench.py` (bench); `runs.py` holds train's run folder (resume, Ctrl-C), `common.py` the usage error and
argument types they share, `formatting.py` the help layout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .adapters import add_adapter_commands
from .advise import add_advise
from .bench import add_bench
from .common import UsageError
from .train import add_train

__all__ = ["UsageError", "build_parser", "main"]

EPILOG = """examples:
  loraredux advise --out runs/advise               # measure MiniLM on Rotten Tomatoes, recommend a configuration
  loraredux advise --model smollm2 --budget 24GiB --verify --out runs/advise-lm
  loraredux train --out runs/lora                  # MiniLM on Rotten Tomatoes, LoRA r=8, a few minutes
  loraredux train --model smollm2 --data kjv --steps 40 --out runs/kjv
  loraredux train --method dora --rank 4 --out runs/dora
  loraredux inspect runs/lora
  loraredux merge runs/lora --out runs/lora-merged
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraredux",
        description="Low-rank adaptation read through signal processing: advise, fine-tune, inspect and "
        "merge adapters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress details, and show the traceback of an error (anywhere on the line)",
    )
    parser.add_argument("--version", action="version", version=f"loraredux {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_advise(sub)
    add_train(sub)
    add_adapter_commands(sub)
    add_bench(sub)
    return parser


def _version() -> str:
    from loraredux import __version__

    return __version__


_VERBOSE = ("-v", "--verbose")


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """argv without -v / --verbose, wherever they stand (before a `--`), and whether one was there: argparse
    takes a main-parser flag only before the subcommand."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a not in _VERBOSE] + argv[end:]
    return kept, len(kept) != len(argv)


def _error(err: BaseException, verbose: bool) -> None:
    """One line for a person; the traceback too with -v."""
    if verbose:
        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2: a usage or library error, 1: a run that failed on the way,
    such as a diverged loss or a file system error, 130: interrupted by Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed, verbose = _split_verbose(argv)
    args = build_parser().parse_args(parsed)
    args.verbose = args.verbose or verbose
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    # What a person waiting needs at the default level: a one-time conversion of a packaged model (and where its
    # cache goes), and, where stderr is a log rather than a terminal, the progress lines that replace the bars.
    for name in ("loraredux.assets", "loraredux.train", "loraredux.bench.runner"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Library errors are written for people: show them without a traceback.
        _error(err, args.verbose)
        return 2
    except BrokenPipeError:
        # The reader went away (`loraredux inspect DIR | head`): no message, as other command-line tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FloatingPointError, OSError) as err:
        # A run that diverged, a disk that filled, a file that could not be read: no bug, one line.
        _error(err, args.verbose)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C is a choice, not a crash: one line (a command says how to continue), the shell's status 130.
        note = getattr(args, "on_interrupt", None)
        print(note(args, argv) if note is not None else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
