"""Running the `higgs-trainer` command in-process, for the CLI tests."""

from higgs_trainer.cli import main


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `higgs-trainer ARGV`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, text):
    """stderr is one line, holds `text`, and shows no traceback."""
    assert text in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
