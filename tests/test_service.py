"""systemd: the rendered unit, install without a service manager, and a real daemon talking to
a real NOTIFY_SOCKET (READY, STATUS, WATCHDOG, SIGHUP reload)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from agent_core import service as svc
from agent_core.daemon import Daemon
from config.settings import load_settings, watchdog_interval_s
from self_mutation_watcher.watcher import Watcher
from tests.conftest import REPO, gremlin, make_home, start_daemon, wait_for, write_config

READY_S = 120
GREMLIN_BIN = Path(sys.executable).absolute().parent / "gremlin"
SYSTEM_HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectKernelTunables=yes",
                    "ProtectControlGroups=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes", "UMask=0077",
                    "CapabilityBoundingSet=")


def quiet_config(home: Path, watched: Path, **sections: dict) -> None:
    """The test home's config: watch `watched`, no dashboard (no port to fight over)."""
    write_config(home, watch={"roots": [str(watched)], "own_source": False, "debounce_ms": 100},
                 memory={"index_save_interval_s": 0.5}, dashboard={"enabled": False}, **sections)


# -- the unit ------------------------------------------------------------------------------

def test_print_renders_the_venv_gremlin_the_home_and_the_hardening(home: Path, watched: Path):
    system = gremlin("service", "install", "--system", "--print", home=home).stdout
    assert f"ExecStart={GREMLIN_BIN} --home {home} daemon" in system
    assert "Type=notify" in system and "NotifyAccess=main" in system and "WatchdogSec=60" in system
    assert "ExecReload=/bin/kill -HUP $MAINPID" in system and "Restart=on-failure" in system
    lines = system.splitlines()
    assert all(line in lines for line in SYSTEM_HARDENING), [h for h in SYSTEM_HARDENING if h not in lines]
    assert f"ReadWritePaths=-{home} -{watched}" in lines  # mutate tasks write into the watched roots
    under_home = any(str(p).startswith(("/home/", "/root/")) for p in (home, watched, REPO, GREMLIN_BIN))
    assert f"ProtectHome={'read-only' if under_home else 'yes'}" in lines
    assert "WantedBy=multi-user.target" in lines and any(line.startswith("User=") for line in lines)
    user = gremlin("service", "install", "--user", "--print", home=home).stdout
    assert f"ExecStart={GREMLIN_BIN} --home {home} daemon" in user and "NoNewPrivileges=yes" in user
    assert "#ProtectSystem=strict" in user.splitlines() and "ProtectSystem=strict" not in user.splitlines()
    assert "WantedBy=default.target" in user and "User=" not in user and "#ProtectHome=" in user


def test_paths_are_quoted_and_homes_under_home_are_read_only(tmp_path: Path):
    home = make_home(tmp_path / "a b%c")
    settings = load_settings(home)
    unit = svc.render_unit(settings, "system", Path("/home/me/venv dir/bin/gremlin"), "me")
    assert f'ExecStart="/home/me/venv dir/bin/gremlin" --home "{str(home).replace("%", "%%")}" daemon' in unit
    assert f'ReadWritePaths="-{str(home).replace("%", "%%")}"' in unit
    assert "ProtectHome=read-only" in unit.splitlines() and "User=me" in unit.splitlines()
    with pytest.raises(svc.ServiceError, match="cannot be written into a unit file"):
        svc.render_unit(settings, "system", Path("/opt/bad\nExecStartPre=/bin/sh/gremlin"), "me")


def _verify(unit_file: Path, user: bool, env: dict) -> subprocess.CompletedProcess:
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit_file)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("mode", ["system", "user"])
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, settings, mode: str):
    runtime = tmp_path / "runtime"  # `--user verify` needs a runtime folder, even with no manager
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    (tmp_path / mode).mkdir()
    typo = tmp_path / mode / "typo.service"
    typo.write_text("[Service]\nType=notify\nExecStart=/bin/true\nProtectSytem=strict\n")
    checked = _verify(typo, mode == "user", env)
    if "Unknown key" not in checked.stdout + checked.stderr:
        pytest.skip(f"systemd-analyze verify cannot check units here: {(checked.stderr or checked.stdout)[:200]}")
    unit = tmp_path / mode / svc.UNIT_NAME
    unit.write_text(svc.render_unit(settings, mode, GREMLIN_BIN, svc.service_user(settings, mode)))
    verified = _verify(unit, mode == "user", env)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), verified.stderr


# -- install, uninstall, status ---------------------------------------------------------------

def test_install_without_a_service_manager_says_so_and_prints_the_unit(tmp_path: Path, home: Path):
    if svc.manager_problem("user") is None:
        pytest.skip("a user service manager answers on this machine; this is about machines without one")
    env = {**os.environ, "HOME": str(tmp_path / "me"), "XDG_CONFIG_HOME": ""}
    argv = [sys.executable, "-m", "agent_core.cli", "--home", str(home), "service", "install", "--user"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    target = tmp_path / "me" / ".config" / "systemd" / "user" / svc.UNIT_NAME
    assert done.returncode == 0, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "nothing installed" in done.stderr, done.stderr
    assert f"save the unit below as {target}" in done.stderr and "systemctl --user enable --now" in done.stderr
    assert done.stdout == gremlin("service", "install", "--user", "--print", home=home).stdout
    assert f"ExecStart={GREMLIN_BIN} --home {home} daemon" in done.stdout
    assert not target.exists()
    status = subprocess.run([*argv[:-3], "service", "status", "--user"], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=env)
    assert status.returncode == 3 and "not installed" in status.stdout and "Traceback" not in status.stderr


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  *is-active*) exit 3 ;;
  *"show --property=LoadState"*) printf 'LoadState=loaded\\nActiveState=active\\nSubState=running\\nMainPID=42\\n'
                                 printf 'StatusText=watching 1 roots; trainer idle; 0 tasks queued\\n' ;;
esac
exit 0
"""


@pytest.fixture
def fake_systemd(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in systemctl (the service manager is the system boundary) that logs its arguments."""
    fake, log = tmp_path / "systemctl", tmp_path / "systemctl.log"
    fake.write_text(FAKE_SYSTEMCTL.format(log=log))
    fake.chmod(0o755)
    (tmp_path / "booted").mkdir()
    monkeypatch.setattr(svc, "SYSTEMCTL", str(fake))
    monkeypatch.setattr(svc, "SYSTEMD_BOOTED", tmp_path / "booted")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return log


def test_install_writes_enables_and_uninstall_removes(tmp_path: Path, settings, fake_systemd: Path):
    done = svc.install(settings, "user")
    unit = tmp_path / "xdg" / "systemd" / "user" / svc.UNIT_NAME
    assert done.installed and done.path == unit and not done.was_running
    assert unit.read_text() == svc.render_unit(settings, "user", GREMLIN_BIN)
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert fake_systemd.read_text().splitlines() == [
        "--user show --property=Version", "--user is-active --quiet gremlin.service", "--user daemon-reload",
        "--user enable --now --no-block gremlin.service"]
    other = load_settings(make_home(tmp_path / "other"))
    with pytest.raises(svc.ServiceError, match=f"already runs the daemon of home {settings.home}"):
        svc.install(other, "user")
    info = svc.status("user")
    assert info.active and info.home == str(settings.home) and info.properties["MainPID"] == "42"
    removed = svc.uninstall("user")
    assert removed.removed and removed.home == str(settings.home) and not unit.exists()
    assert fake_systemd.read_text().splitlines()[-2:] == ["--user disable --now gremlin.service",
                                                          "--user daemon-reload"]
    assert not svc.uninstall("user").removed


# -- reload, watchdog, health ---------------------------------------------------------------

def test_plan_reload_applies_live_keys_and_keeps_restart_ones(settings):
    new = dataclasses.replace(
        settings, watch=dataclasses.replace(settings.watch, debounce_ms=999),
        logging=dataclasses.replace(settings.logging, level="DEBUG", backup_count=9),
        shell=dataclasses.replace(settings.shell, allow=("uname",)))
    plan = svc.plan_reload(settings, new)
    assert plan.applied == ("logging.level", "shell.allow")
    assert plan.pending == ("watch.debounce_ms", "logging.backup_count")
    assert plan.settings.watch == settings.watch and plan.settings.logging.backup_count == settings.logging.backup_count
    assert plan.settings.logging.level == "DEBUG" and plan.settings.shell.allow == ("uname",)
    assert svc.plan_reload(settings, settings) == svc.Reload(settings, (), ())


def test_notifier_pings_at_half_the_interval_and_stops_for_good_when_unhealthy(caplog):
    sent: list[str] = []
    notifier = svc.Notifier(sent.append, watchdog_s=2.0)
    notifier.ready("watching 1 roots", now=0.0)
    for now in (0.5, 1.0, 1.5, 2.0, 3.0):
        notifier.tick(True, lambda: "watching 1 roots", now=now)
    assert sent == ["READY=1\nSTATUS=watching 1 roots", "WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"]
    notifier.tick(True, lambda: "watching 1 roots; trainer training", now=5.0)
    assert sent[-2:] == ["WATCHDOG=1", "STATUS=watching 1 roots; trainer training"]
    sent.clear()
    for now in (6.0, 7.0, 8.0):
        notifier.tick(now == 8.0, lambda: "changed", now=now)
    assert sent == ["STATUS=unhealthy: the watcher or the scheduler stopped"]
    assert [r.levelname for r in caplog.records if "unhealthy" in r.getMessage()] == ["ERROR"]


def test_watchdog_interval_is_for_this_process_only(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert watchdog_interval_s() is None


def test_healthy_needs_the_watcher_worker_and_the_scheduler(settings, store):
    daemon = Daemon(settings)
    daemon.watcher = Watcher(settings, store, lambda events: None)
    daemon.scheduler = BackgroundScheduler(timezone="UTC")
    daemon.scheduler.start()
    assert not daemon.healthy()  # the watcher is not started
    daemon.watcher.start()
    try:
        assert daemon.healthy()
        daemon.scheduler.shutdown()
        assert not daemon.healthy()
    finally:
        daemon.watcher.stop()


# -- a real daemon on a real NOTIFY_SOCKET --------------------------------------------------

class Served:
    """A daemon started with NOTIFY_SOCKET and WATCHDOG_USEC, and the socket it notifies."""

    def __init__(self, tmp: Path):
        self.watched = tmp / "project"
        self.watched.mkdir()
        self.home = make_home(tmp, self.watched)
        quiet_config(self.home, self.watched)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.proc = start_daemon(self.home, env={"NOTIFY_SOCKET": str(tmp / "notify.sock"),
                                                 "WATCHDOG_USEC": "2000000"})
        self.ready = self.next(lambda m: m.startswith("READY=1"), READY_S)

    def next(self, wanted, timeout: float) -> str:
        """The next datagram `wanted` accepts (others are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.notify.settimeout(left)
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                break
            if wanted(message):
                return message
        raise AssertionError(f"no wanted notification within {timeout}s; daemon alive: {self.proc.poll() is None}")

    def drain(self) -> list[str]:
        """Every datagram waiting now."""
        self.notify.setblocking(False)
        got = []
        try:
            while True:
                got.append(self.notify.recv(4096).decode())
        except BlockingIOError:
            return got
        finally:
            self.notify.setblocking(True)

    def log(self) -> list[dict]:
        path = self.home / "data" / "logs" / "system" / "gremlin.log"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def reload(self) -> None:
        """SIGHUP, then the notify-reload handshake."""
        self.drain()
        self.proc.send_signal(signal.SIGHUP)
        reloading = self.next(lambda m: m.startswith("RELOADING=1"), 30)
        assert "\nMONOTONIC_USEC=" in reloading
        assert self.next(lambda m: m != "WATCHDOG=1", 30).startswith("READY=1\nSTATUS=watching 1 roots")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("served"))
    try:
        yield served
        served.drain()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0
        assert served.next(lambda m: m == "STOPPING=1", 5)
    finally:
        served.notify.close()
        if served.proc.poll() is None:
            served.proc.kill()


def test_ready_status_and_watchdog_pings_while_healthy(served: Served):
    assert served.ready == "READY=1\nSTATUS=watching 1 roots; trainer idle; 0 tasks queued"
    served.drain()
    time.sleep(3.5)
    pings = [m for m in served.drain() if m == "WATCHDOG=1"]
    assert 2 <= len(pings) <= 5, pings  # every second: half of WATCHDOG_USEC (2 s)


def shell_task(home: Path, *argv: str) -> subprocess.CompletedProcess:
    return gremlin("task", "add", "--type", "shell", "--wait", "--json", "--", *argv, home=home, check=False,
                   timeout=60)


def test_sighup_applies_a_good_config_live_and_names_what_needs_a_restart(served: Served):
    quiet_config(served.home, served.watched, shell={"allow": ["uname"]}, training={"cooldown_s": 60.0},
                 logging={"backup_count": 2})
    config = served.home / "config" / "gremlin.toml"
    config.write_text(config.read_text().replace("debounce_ms = 100", "debounce_ms = 150"))
    refused = shell_task(served.home, "uname")  # the file allows it; the daemon runs with the old allowlist
    assert refused.returncode == 1 and "not allowed" in refused.stdout, refused.stdout
    served.reload()
    ran = shell_task(served.home, "uname")
    assert ran.returncode == 0, ran.stdout
    log = served.log()
    reloaded = [r for r in log if r["msg"] == "config reloaded"]
    assert reloaded and reloaded[-1]["applied"] == ["training.cooldown_s", "shell.allow"]
    restart = [r for r in log if r["msg"].startswith("needs a restart: ")]
    assert restart[-1]["msg"] == "needs a restart: watch.debounce_ms, logging.backup_count"
    assert restart[-1]["level"] == "WARNING"


def test_sighup_refuses_a_bad_config_and_keeps_serving(served: Served):
    config = served.home / "config" / "gremlin.toml"
    good = config.read_text()
    config.write_text(good + '\n[planner]\nmax_epochs = "many"\n')
    served.reload()
    refused = [r for r in served.log() if r["msg"] == "config reload refused; the running config stays"]
    assert refused and refused[-1]["level"] == "ERROR" and "[planner] max_epochs" in refused[-1]["error"]
    assert served.proc.poll() is None
    config.write_text(good)  # the CLI reads the config too: mend it, with no reload, to ask the daemon
    info = json.loads(gremlin("status", "--json", home=served.home).stdout)
    assert info["running"] and info["state"] == "ready" and info["pid"] == served.proc.pid
    wait_for(lambda: "WATCHDOG=1" in served.drain(), 5, 0.2, "a watchdog ping after the refused reload")
