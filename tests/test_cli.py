import os
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


def test_a_process_of_a_multi_process_launch_skips_the_interpreter_teardown():
    # gloo's threads destroyed during teardown now and then abort a finished process: under
    # torchrun a process leaves at once after flushing, with the command's exit code
    script = ("import atexit, sys; atexit.register(lambda: print('teardown ran', flush=True)); "
              "sys.argv = ['agrpo', *sys.argv[1:]]; from agrpo.cli import entry; entry()")
    for world, args, code in (("2", ["--version"], 0), ("2", ["bogus"], 2), ("1", ["--version"], 0)):
        env = {**os.environ, "WORLD_SIZE": world}
        proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
        assert proc.returncode == code, proc.stderr
        assert ("teardown ran" in proc.stdout) == (world == "1"), proc.stdout
        assert (proc.stdout.startswith("agrpo ") if code == 0 else "unknown command" in proc.stderr)


def test_unknown_command_is_one_line(capsys):
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command" in err[0]


def test_bench_takes_settings_and_lists_them(capsys):
    """`agrpo bench rollout --help` lists the settings; a bad one stops in one line before any timing."""
    assert main(["bench", "rollout", "--help"]) == 0
    out = capsys.readouterr().out
    assert "cache_threshold" in out and "block_batch" in out
    assert main(["bench", "rollout", "cache_batch=0"]) == 2
    assert capsys.readouterr().err.strip() == "agrpo: error: cache_batch must be >= 1, got 0"
    assert main(["bench", "rollout", "fast"]) == 2
    assert "expected key=value or --json, got 'fast'" in capsys.readouterr().err
