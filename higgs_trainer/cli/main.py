"""The ``higgs-trainer`` command line: ``verify``, ``extract``, ``merge``, ``convert``, ``speak`` and ``listen``.

Here: the argument parser, and running a command: each lives in a module of its own
(`verify`, `extract`, `merge`, `convert`, `speak`, `listen`), imported only once its arguments parsed (``--help``
and ``--version`` import neither torch nor transformers), that calls one library function
(`inspect_path`, `extract_adapter`, `merge_adapter`, `convert_layout`, `speak`, `write_speech_page`) and prints
what it did on stdout (``--json`` for JSON). Exit status: 0 success, 1 failure (bad content, refused, I/O
error), 2 usage error, 130 interrupted (SIGINT), 143 terminated (SIGTERM), from the first moment of
`main` on, imports included; an interrupted command removes what it had begun to write. A signal that
arrives once the finished output is being renamed into place no longer stops the command: it
finishes, exits 0 and says on stderr that the output is complete. Errors are one line on stderr;
``--debug`` adds the traceback.

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
from pathlib import Path
from types import ModuleType

from .._version import __version__
from ..convert.keys import LAYOUTS
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

    speak = commands.add_parser(
        "speak",
        parents=[common],
        help="speak a text with a base model and a saved adapter (no merge): WAV and mel spectrogram",
        description="Load BASE_DIR and the adapter DIR stands for (an adapter, a checkpoint-N, or a run directory: "
        "its final adapter, else its last checkpoint's) without merging, generate TEXT greedily, decode it with the "
        "base's codec (BASE_DIR/audio_tokenizer or --codec) and write OUT.wav and OUT.png. Greedy with the callback's "
        "settings, the codes equal that checkpoint's sample (the sha256 in its speech/speech.json). Needs the speech "
        'extra: pip install "higgs-trainer[speech]".',
    )
    speak.add_argument("--base", required=True, metavar="BASE_DIR", help="the base model directory")
    speak.add_argument("--adapter", required=True, metavar="DIR", help="adapter, checkpoint or run directory")
    speak.add_argument("--text", required=True, help="what to say")
    speak.add_argument("--output", "-o", required=True, metavar="OUT.wav", help="the WAV to write (.png beside it)")
    speak.add_argument("--reference", metavar="WAV", help="a clip whose voice to clone")
    speak.add_argument("--reference-text", metavar="TEXT", help="the reference clip's transcript")
    speak.add_argument("--codec", metavar="DIR", help="the audio codec directory (default: BASE_DIR/audio_tokenizer)")
    speak.add_argument(
        "--max-new-tokens", type=int, default=256, metavar="N", help="generation's length limit (default: 256)"
    )
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


class _Signals:
    """What SIGINT and SIGTERM do while `main` runs.

    Until the command starts to put its finished output in place, the first signal raises
    (``KeyboardInterrupt``, or `_Terminated` for SIGTERM): ``finally`` blocks run and partial
    outputs are removed. Any further one is ignored, so a second Ctrl-C cannot cut the clean-up
    short. A library may swallow that exception (a broad ``except``) or fail in its place (a
    module left half imported): `arrived` keeps the signal, and the command counts as
    interrupted whatever came of it. Once the command has started to rename its output into
    place (`committing`), or has finished, a signal is only recorded: the output is complete.
    """

    def __init__(self) -> None:
        self.arrived: int | None = None
        self.committing: list[Path] = []
        self.finished = False

    def commit_started(self, target: Path) -> None:
        self.committing.append(target)

    def interruption(self) -> BaseException:
        """The exception that stands for the signal that arrived."""
        return KeyboardInterrupt() if self.arrived == signal.SIGINT else _Terminated(self.arrived or signal.SIGTERM)

    def handle(self, signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.arrived = signum
        if not (self.committing or self.finished):
            raise self.interruption()


@contextlib.contextmanager
def _handling_signals(as_program: bool) -> Iterator[_Signals]:
    """Handle SIGTERM and SIGINT with a `_Signals` for the block.

    After it, the previous handlers come back; or, ``as_program`` (the process ends with the
    block), both are ignored: the outcome is printed, a signal while the process exits changes
    nothing. Signals ignored by whoever started us (``nohup``, ``cmd &``) stay ignored. Handlers
    can only be set in the main thread: elsewhere, Python's defaults stay.
    """
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {
        signum: signal.signal(signum, signals.handle)
        for signum in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if as_program else handler)


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
    """Run ``higgs-trainer`` with ``argv`` (default ``sys.argv[1:]``, as the program) and return the exit status.

    Args:
        argv: the command line after the program name, e.g. ``["verify", "out"]``.

    Examples:
        >>> main(["extract", "missing-dir", "--output", "out", "--lora-alpha", "32"])  # usage error, on stderr
        2
    """
    # First of all: from here on a signal is one line, also while torch and transformers import (seconds).
    with _handling_signals(as_program=argv is None) as signals:
        try:
            status = _run(argv, signals)
            signals.finished = True
            return status
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except _Terminated as exc:
            print(f"{PROG}: terminated by {exc}", file=sys.stderr)
            return 128 + exc.signum


def _run(argv: Sequence[str] | None, signals: _Signals) -> int:
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
        print(f"{PROG}: error: name a command: verify, extract, merge, convert, speak or listen", file=sys.stderr)
        return 2
    try:
        command = importlib.import_module(f"{__package__}.{args.command}")  # torch, transformers: seconds
    except BaseException:
        if signals.arrived is None:
            raise
    if signals.arrived is not None:  # whether it raised, a library swallowed it, or a half-imported module failed
        raise signals.interruption()
    return _run_command(command, args, signals)


def _run_command(command: ModuleType, args: argparse.Namespace, signals: _Signals) -> int:
    from .._compat import deepspeed_unseen
    from ..files.atomic import commits_announced_to

    # What the command prints goes to stdout; anything else printed meanwhile (boson_multimodal logs to stdout when
    # first imported) goes to stderr, so `--json` output stays one JSON document.
    stdout = sys.stdout
    args.echo = functools.partial(print, file=stdout)
    args.complain = functools.partial(print, f"{PROG} {args.command}:", file=sys.stderr)
    with (
        _console(args.verbose, args.debug),
        deepspeed_unseen(),
        commits_announced_to(signals.commit_started),
        contextlib.redirect_stdout(sys.stderr),
    ):
        try:
            try:
                status = command.run(args)
            except BaseException:
                if signals.arrived is None or signals.committing:
                    raise
            if signals.arrived is not None and not signals.committing:  # whatever became of the exception
                raise signals.interruption()
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
    if signals.arrived is not None and status == 0:  # it arrived as the output was put in place: complete, kept
        written = ", ".join(map(str, signals.committing))
        name = signal.Signals(signals.arrived).name
        print(
            f"{PROG} {args.command}: {name} arrived once {written} was complete: kept it and finished", file=sys.stderr
        )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
