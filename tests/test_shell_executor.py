"""The shell executor with real processes: allowlist, confinement, timeouts, caps, environment."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from config.settings import load_settings
from tests.conftest import REPO, wait_for, write_config
from tools.shell_executor import CappedBuffer, ShellRefused, check_command, confine_cwd, run_command, scrubbed_env

PY = sys.executable
ECHO = shutil.which("echo")


def shell_settings(home: Path, watched: Path, **shell):
    """Settings watching `watched` with [shell] overrides; the interpreter is allowed by path."""
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 shell={"allow": ["echo", "false", PY], **shell})
    return load_settings(home)


@pytest.fixture
def cfg(home: Path, watched: Path):
    return shell_settings(home, watched, timeout_s=30.0)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for init to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def python(code: str) -> list[str]:
    return [PY, "-c", code]


# -- the allowlist -----------------------------------------------------------------------

def test_unlisted_executable_is_refused_and_never_runs(cfg, watched):
    marker = watched / "ran"
    with pytest.raises(ShellRefused) as info:
        run_command(["sh", "-c", f"touch {marker}"], cfg)
    message = str(info.value)
    assert "'sh'" in message and "[shell] allow" in message and str(cfg.config_file) in message
    assert not marker.exists()


def test_allowed_by_bare_name_and_by_absolute_path(cfg):
    assert check_command(["echo", "hi"], cfg) == ECHO
    assert check_command([PY, "-V"], cfg) == PY
    result = run_command(["echo", "hi", "there"], cfg)
    assert result.ok and result.exit_code == 0 and result.stdout == "hi there\n"
    assert run_command([ECHO, "by path"], cfg).stdout == "by path\n"  # same file as the allowed `echo`


def test_same_file_needs_the_same_name(cfg, tmp_path):
    """A link to an allowed binary under another name is refused (busybox-style multi-call binaries)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "echo").symlink_to(ECHO)
    (bin_dir / "sh").symlink_to(ECHO)
    assert check_command([str(bin_dir / "echo")], cfg) == str(bin_dir / "echo")
    with pytest.raises(ShellRefused, match="not allowed"):
        check_command([str(bin_dir / "sh")], cfg)


def test_allowed_but_missing_executable_is_refused(home, watched):
    cfg = shell_settings(home, watched, allow=["gremlin-no-such-tool"])
    with pytest.raises(ShellRefused, match="not found"):
        check_command(["gremlin-no-such-tool"], cfg)


@pytest.mark.parametrize("argv", ["echo hi", [], ["echo", "a\0b"], ["echo", 3], [""], ["./echo"]])
def test_malformed_argv_is_refused(cfg, argv):
    with pytest.raises(ShellRefused):
        check_command(argv, cfg)


def test_no_shell_true_anywhere_in_the_project():
    needle = "shell" + "=True"
    offenders = [str(p) for folder in ("config", "memory", "self_mutation_watcher", "self_training", "agents",
                                       "agent_core", "tools", "dashboard", "tests")
                 for p in (REPO / folder).rglob("*.py") if needle in p.read_text(encoding="utf-8")]
    assert offenders == []


# -- the working folder -------------------------------------------------------------------

def test_cwd_defaults_to_the_first_root_and_accepts_folders_inside(cfg, watched):
    (watched / "sub").mkdir()
    assert confine_cwd(None, cfg) == watched.resolve()
    assert confine_cwd("sub", cfg) == (watched / "sub").resolve()
    assert confine_cwd(watched / "sub", cfg) == (watched / "sub").resolve()
    assert run_command(python("import os; print(os.getcwd())"), cfg, cwd="sub").stdout.strip() == \
        str((watched / "sub").resolve())


def test_cwd_outside_the_roots_is_refused(cfg, watched, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (watched / "escape").symlink_to(elsewhere)
    for cwd in ("..", "sub/../..", elsewhere, "escape", "/"):
        with pytest.raises(ShellRefused, match="outside the watched roots|does not exist"):
            confine_cwd(cwd, cfg)
    with pytest.raises(ShellRefused, match="outside the watched roots"):
        run_command(python("open('ran', 'w')"), cfg, cwd=elsewhere)
    assert not (elsewhere / "ran").exists()


def test_missing_cwd_is_refused(cfg):
    with pytest.raises(ShellRefused, match="does not exist"):
        confine_cwd("not-there", cfg)


# -- timeouts and cancelling ----------------------------------------------------------------

SPAWNS_GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(60)
"""


def grandchild_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), 10, what="the grandchild's pid"))


def test_timeout_kills_the_whole_process_group(cfg, watched):
    pidfile = watched / "grandchild.pid"
    started = time.monotonic()
    result = run_command([PY, "-c", SPAWNS_GRANDCHILD, str(pidfile)], cfg, timeout_s=1.5)
    assert result.timed_out and not result.cancelled and result.exit_code is None and not result.ok
    assert 1.4 < result.seconds < 8 and time.monotonic() - started < 10
    assert result.stdout == "started\n"
    pid = grandchild_pid(pidfile)
    wait_for(lambda: not alive(pid), 5, what="the grandchild to die")


def test_asked_timeout_is_capped_by_the_config(home, watched):
    cfg = shell_settings(home, watched, timeout_s=0.5)
    result = run_command(python("import time; time.sleep(30)"), cfg, timeout_s=60)
    assert result.timed_out and result.seconds < 5


def test_stop_event_cancels_the_command(cfg, watched):
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    pidfile = watched / "grandchild.pid"
    result = run_command([PY, "-c", SPAWNS_GRANDCHILD, str(pidfile)], cfg, stop=stop)
    timer.join()
    assert result.cancelled and not result.timed_out and result.exit_code is None
    assert result.seconds < 5
    pid = grandchild_pid(pidfile)
    wait_for(lambda: not alive(pid), 5, what="the grandchild to die")


def test_background_process_holding_the_pipes_does_not_hang(cfg, watched):
    pidfile = watched / "bg.pid"
    code = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " open(sys.argv[1], 'w').write(str(c.pid)); print('bye')")
    result = run_command([PY, "-c", code, str(pidfile)], cfg)
    assert result.ok and result.stdout == "bye\n" and result.seconds < 10
    pid = int(pidfile.read_text())
    wait_for(lambda: not alive(pid), 5, what="the leftover process to die")


def test_command_that_closes_its_pipes_still_times_out(cfg):
    result = run_command(python("import os, time; os.close(1); os.close(2); time.sleep(30)"), cfg, timeout_s=1)
    assert result.timed_out and result.seconds < 5


# -- output ---------------------------------------------------------------------------------

def test_output_keeps_head_and_tail_and_counts_every_byte(home, watched):
    cfg = shell_settings(home, watched, max_output_bytes=4096, timeout_s=30.0)
    # Several MB on both streams, stderr first: a reader that waits on one pipe would deadlock.
    code = ("import sys; e = sys.stderr.buffer; o = sys.stdout.buffer;"
            " e.write(b'E' * 3_000_000); o.write(b'HEAD' + b'x' * 5_000_000 + b'TAIL'); e.write(b'END')")
    result = run_command(python(code), cfg)
    assert result.ok and not result.timed_out
    assert result.stdout_bytes == 5_000_008 and result.stderr_bytes == 3_000_003 and result.truncated
    assert result.stdout.startswith("HEAD") and result.stdout.endswith("TAIL")
    assert f"\n[... {5_000_008 - 4096} bytes cut ...]\n" in result.stdout
    assert result.stderr.endswith("EEEND") and len(result.stderr) < 4096 + 100


def test_small_output_is_kept_whole(cfg):
    result = run_command(python("import sys; print('out'); print('err', file=sys.stderr)"), cfg)
    assert (result.stdout, result.stderr, result.truncated) == ("out\n", "err\n", False)
    assert (result.stdout_bytes, result.stderr_bytes) == (4, 4)


def test_invalid_utf8_is_replaced(cfg):
    result = run_command(python("import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe')"), cfg)
    assert result.stdout == "ok \ufffd\ufffd"


def test_stdin_is_dev_null_whatever_ours_is(cfg):
    """With our fd 0 a pipe that never ends, a child inheriting it would block; it must get /dev/null."""
    saved, (read_end, write_end) = os.dup(0), os.pipe()
    os.dup2(read_end, 0)
    try:
        code = "import os, sys; print(os.path.samestat(os.fstat(0), os.stat(os.devnull)), repr(sys.stdin.read()))"
        result = run_command(python(code), cfg, timeout_s=5)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)
    assert not result.timed_out and result.stdout == "True ''\n"


def test_input_bytes_are_fed_while_output_is_read(home, watched):
    cfg = shell_settings(home, watched, max_output_bytes=4096, timeout_s=30.0)
    data = b"".join(b"line %07d\n" % i for i in range(300_000))  # 3.6 MB: far more than a pipe holds
    # The child echoes as it reads: feeding all input before reading any output would deadlock.
    code = "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer, 4096)"
    result = run_command(python(code), cfg, input_bytes=data)
    assert result.ok and result.stdout_bytes == len(data)
    assert result.stdout.startswith("line 0000000\n") and result.stdout.endswith("line 0299999\n")


def test_input_the_child_never_reads_is_dropped(cfg):
    result = run_command(python("print('not reading')"), cfg, input_bytes=b"x" * 1_000_000)
    assert result.ok and result.stdout == "not reading\n"
    assert run_command(python("import sys; print(len(sys.stdin.read()))"), cfg, input_bytes=b"").stdout == "0\n"


def test_capped_buffer_memory_stays_bounded():
    buffer = CappedBuffer(1000)
    for _ in range(10_000):
        buffer.add(b"0123456789" * 10)
    assert buffer.total == 1_000_000 and len(buffer.head) == 500 and len(buffer.tail) <= 1000
    assert buffer.text().endswith("0123456789" * 50) and "[... 999000 bytes cut ...]" in buffer.text()


def test_nonzero_exit_code_is_reported(cfg):
    result = run_command(python("import sys; sys.stderr.write('boom'); sys.exit(3)"), cfg)
    assert result.exit_code == 3 and not result.ok and result.stderr == "boom"
    assert run_command(["false"], cfg).exit_code == 1
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["exit_code"] == 3 and as_dict["ok"] is False and as_dict["argv"][0] == PY


# -- environment ----------------------------------------------------------------------------

def test_environment_is_scrubbed(cfg, monkeypatch):
    monkeypatch.setenv("GREMLIN_TEST_API_TOKEN", "hunter2")
    result = run_command(python("import json, os; print(json.dumps(dict(os.environ)))"), cfg)
    env = json.loads(result.stdout)
    assert "GREMLIN_TEST_API_TOKEN" not in env and "hunter2" not in result.stdout
    assert env["PATH"] == os.environ["PATH"]
    # CPython may coerce a C locale by setting LC_CTYPE, which env_keep names anyway.
    assert set(env) <= set(cfg.shell.env_keep)


def test_base_env_is_filtered_by_env_keep(cfg):
    base = {"PATH": os.environ["PATH"], "HOME": "/nowhere", "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "y"}
    assert scrubbed_env(cfg, base) == {"PATH": os.environ["PATH"], "HOME": "/nowhere"}
    result = run_command(python("import os; print(os.environ.get('HOME'), os.environ.get('GITHUB_TOKEN'))"),
                         cfg, base_env=base)
    assert result.stdout == "/nowhere None\n"
