"""The ``higgs-trainer`` command line: ``verify``, ``extract``, ``merge``, ``convert`` and ``listen``.

Here: the argument parser, and running a command: each lives in a module of its own
(`verify`, `extract`, `merge`, `convert`, `listen`), imported only once its arguments parsed (``--help`` and
``--version`` import neither torch nor transformers), that calls one library function
(`inspect_path`, `extract_adapter`, `merge_adapter`, `convert_layout`, `write_speech_page`) and prints what it did on
stdout (``--json`` for JSON). Exit status: 0 success, 1 failure (bad content, refused, I/O
error), 2 usage error, 130 interrupted (SIGINT), 143 terminated (SIGTERM); an interrupted command
removes what it had begun to write. Errors are one line on stderr; ``--debug`` adds the traceback.

Examples:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> peft_model = get_peft_model(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "v_proj": torch.nn.Linear(8, 8)}), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    >>> for name, param in peft_model.named_parameters():  # what training does: lora_B leaves its zero init
    ...     if "lora_B" in name:
    ...         _ = torch.nn.init.normal_(param)
    >>> for directory in ("out/checkpoint-2", "out"):
    ...     peft_model.save_pretrained(f"{directory}/lora_adapters")
    >>> main(["verify", "out"])
    PASS out/lora_adapters: 4 tensors, 128 parameters, 512 B; r=4, lora_alpha=8; targets q_proj, v_proj
    PASS out/checkpoint-2/lora_adapters: 4 tensors, 128 parameters, 512 B; r=4, lora_alpha=8; targets q_proj, v_proj
    2 passed, 0 failed
    0
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence

from .._version import __version__
from ..convert.layouts import LAYOUTS
from ..errors import HiggsTrainerError, UsageError, first_line
from ..files.sizes import parse_size
from ..names import DTYPE_NAMES

PROG = "higgs-trainer"


class _ArgumentError(Exception):
    """A command line argparse rejects; main() turns it into one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage and exits; one line is enough
        raise _ArgumentError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _shard_size(text: str) -> int:
    """``--max-shard-size``'s value in bytes; argparse turns the error into exit status 2."""
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``higgs-trainer`` and its subcommands.

    Examples:
        >>> build_parser().parse_args(["extract", "ckpt", "--output", "out", "--lora-alpha", "32"]).lora_alpha
        32.0
    """
    parser = _Parser(
        prog=PROG, description="Verify, rescue, merge and convert LoRA adapters of Higgs Audio (or any PEFT) runs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logging, and a traceback on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done (INFO) on stderr")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="debug logging and tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log steps on stderr")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="check adapter, checkpoint or run directories by their content",
        description="Check every adapter PATH stands for: an adapter directory, a checkpoint's lora_adapters, or a "
        "run's final lora_adapters and every checkpoint-*. Exit 0 when all pass, 1 when any fails.",
    )
    verify.add_argument("paths", nargs="+", metavar="PATH")
    verify.add_argument("--base", metavar="BASE_DIR", help="also check the adapters' modules against this base model")

    extract = commands.add_parser(
        "extract",
        parents=[common],
        help="rescue the LoRA adapter from a full checkpoint written without one",
        description="Read only the LoRA tensors of CHECKPOINT's full weights (model.safetensors, sharded "
        "model-*.safetensors with an index, or pytorch_model.bin) and write a standard adapter directory.",
    )
    extract.add_argument("checkpoint", metavar="CHECKPOINT")
    extract.add_argument("--output", "-o", required=True, metavar="DIR", help="adapter directory to write")
    extract.add_argument("--lora-alpha", type=float, metavar="A", help="lora_alpha used in training")
    extract.add_argument("--adapter-config", metavar="FILE", help="the run's adapter_config.json (or its directory)")
    extract.add_argument("--prefix", help="wrapper prefix to take, when several PEFT components hold LoRA tensors")
    extract.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")

    merge = commands.add_parser(
        "merge",
        parents=[common],
        help="merge an adapter into its base model and save the merged model",
        description="Merge the adapter into BASE_DIR and save the merged model in safetensors with the base's config, "
        "tokenizer and processor files. A safetensors base is merged tensor by tensor without loading the model "
        "(memory follows the largest tensor); --in-memory, or a pytorch_model.bin base, loads BASE_DIR "
        "(HiggsAudioModel for a higgs_audio config) and merges with peft's merge_and_unload.",
    )
    merge.add_argument("--base", required=True, metavar="BASE_DIR", help="the base model directory")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="adapter (or checkpoint) directory")
    merge.add_argument("--output", "-o", required=True, metavar="OUT", help="directory for the merged model")
    merge.add_argument("--dtype", choices=DTYPE_NAMES, help="save in this dtype (default: the base's own)")
    merge.add_argument("--compare", action="store_true", help="compare base, adapter and merged logits on a probe")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    merge.add_argument(
        "--allow-untrained", action="store_true", help="merge even an adapter whose lora_B are all still zero"
    )
    merge.add_argument(
        "--in-memory", action="store_true", help="load the base model and merge with peft (default: stream the tensors)"
    )
    merge.add_argument(
        "--max-shard-size",
        type=_shard_size,
        metavar="SIZE",
        help="largest weight file of the output: bytes, or 500MB, 5GB, 1.5GB, 2GiB (default: transformers')",
    )

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert adapters or a model between the boson_multimodal and transformers Higgs layouts",
        description="Rename the keys of SRC (an adapter, a checkpoint or run directory: each lora_adapters in it, or "
        "a full Higgs model directory) for HiggsAudioV2ForConditionalGeneration (--to transformers) or boson's "
        "HiggsAudioModel (--to boson), rewrite adapter_config.json / config.json, check the result, write DIR.",
    )
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("--to", required=True, choices=LAYOUTS, help="the layout to write")
    convert.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")
    convert.add_argument("--base", metavar="BASE_DIR", help="also load converted adapters onto this base with peft")
    convert.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")

    listen = commands.add_parser(
        "listen",
        parents=[common],
        help="write the run's listening page (speech.html) and print its table of samples",
        description="Read the speech samples of every checkpoint of RUN (checkpoint-N/speech/, written by the speech "
        "callback), write RUN/speech.html (players, spectrograms, flags, scores, the loss and scores against the "
        "step, the best checkpoint marked; it opens from disk with no server) and print the same table.",
    )
    listen.add_argument("run", metavar="RUN", help="the run's output directory")
    listen.add_argument("--output", "-o", metavar="PAGE", help="write the page here instead of RUN/speech.html")
    return parser


# running


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so staging directories are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT unwind the stack (``finally`` blocks run, partial outputs are removed), once.

    The first of them raises; any further one is ignored until the command has cleaned up and
    returned, so a second Ctrl-C cannot cut the clean-up short. The previous handlers come back after.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated(signum)

    previous = {
        signum: signal.signal(signum, stop)
        for signum in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(signum) is not signal.SIG_IGN  # ignored by whoever started us (nohup, `cmd &`): stays so
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _console(verbose: bool, debug: bool) -> Iterator[None]:
    """Logging to stderr for the run (WARNING, INFO with --verbose, DEBUG with --debug); library chatter off."""
    import transformers  # the command module has imported it already; --help and --version never get here

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
    package = logging.getLogger("higgs_trainer")
    old_level = package.level
    package.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    package.addHandler(handler)
    old_verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not (verbose or debug):
        transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            if not (verbose or debug):
                warnings.simplefilter("ignore")  # what matters is checked and reported as errors
            yield
    finally:
        package.removeHandler(handler)
        package.setLevel(old_level)
        transformers.logging.set_verbosity(old_verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _fail(command: str, exc: BaseException, status: int, debug: bool, unexpected: bool = False) -> int:
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = first_line(exc)
    if unexpected:
        message = f"unexpected {type(exc).__name__}: {message}" + (
            "" if debug else " (rerun with --debug for the traceback)"
        )
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``higgs-trainer`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Examples:
        >>> main(["extract", "missing-dir", "--output", "out", "--lora-alpha", "32"])  # usage error, on stderr
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: name a command: verify, extract, merge, convert or listen", file=sys.stderr)
        return 2
    try:  # the command's module imports torch and transformers: seconds in which a Ctrl-C must be one line too
        command = importlib.import_module(f"{__package__}.{args.command}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    # What the command prints goes to stdout; anything else printed meanwhile (DeepSpeed and boson_multimodal log to
    # stdout when first imported) goes to stderr, so `--json` output stays one JSON document.
    stdout = sys.stdout
    args.echo = functools.partial(print, file=stdout)
    args.complain = functools.partial(print, f"{PROG} {args.command}:", file=sys.stderr)
    with _console(args.verbose, args.debug), _interruptible(), contextlib.redirect_stdout(sys.stderr):
        try:
            return command.run(args)
        except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
            return 1
        except UsageError as exc:
            return _fail(args.command, exc, 2, args.debug)
        except (HiggsTrainerError, OSError) as exc:
            return _fail(args.command, exc, 1, args.debug)
        except KeyboardInterrupt:
            print(f"{PROG} {args.command}: interrupted (nothing written)", file=sys.stderr)
            return 130
        except _Terminated as exc:
            print(f"{PROG} {args.command}: terminated by {exc} (nothing written)", file=sys.stderr)
            return 128 + exc.signum
        except Exception as exc:
            return _fail(args.command, exc, 1, args.debug, unexpected=True)


if __name__ == "__main__":
    raise SystemExit(main())
