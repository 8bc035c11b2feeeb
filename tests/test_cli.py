import subprocess
import sys

from agrpo.cli import main


def _run(*args, close_stdout=False):
    proc = subprocess.Popen([sys.executable, "-m", "agrpo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if close_stdout:  # `agrpo config train | head -0`: the reader is gone before anything is written
        proc.stdout.close()
        err = proc.stderr.read()
        return proc.wait(), b"", err
    out, err = proc.communicate()
    return proc.returncode, out, err


def test_module_entry_point_and_version():
    rc, out, err = _run("--version")
    assert rc == 0 and out.decode().startswith("agrpo "), err


def test_closed_pipe_exits_quietly():
    rc, _, err = _run("config", "train", close_stdout=True)
    assert rc == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_unknown_command_is_one_line(capsys):
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command" in err[0]
