"""The command line: nonsense values get one clear line and exit status 2, no traceback."""
import subprocess
import sys

import pytest

from rnncap.cli import COMMANDS, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rnncap.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "x.json", "--batch-size", "-4"], "--batch-size"),
    (["train", "--data", "x.json", "--hidden", "0"], "--hidden"),
    (["train", "--data", "x.json", "--lr", "nan"], "--lr"),
    (["train", "--data", "x.json", "--dropout", "1.5"], "--dropout"),
    (["train", "--data", "x.json", "--cell", "gru"], "--cell"),
    (["caption", "a.jpg", "--checkpoint", "c.npz", "--beam", "0"], "--beam"),
    (["caption", "a.jpg", "--checkpoint", "c.npz", "--max-length", "-1"], "--max-length"),
    (["caption", "a.jpg", "--checkpoint", "c.npz", "--length-norm", "nan"], "--length-norm"),
    (["evaluate", "--checkpoint", "c.npz", "--data", "x.json", "--length-norm", "-0.5"], "--length-norm"),
])
def test_bad_values_are_one_line_errors(argv, needle):
    r = run_cli(*argv)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_user_errors_print_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    code = main(["caption", str(tmp_path / "a.jpg"), "--checkpoint", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_without_data_is_a_clear_error(capsys):
    assert main(["train"]) == 2
    assert "--data is required" in capsys.readouterr().err
