"""The dashboard in a real headless Chromium against a real daemon: log in, see a change
appear, search, submit a task, and open a hostile diff without anything executing.
Screenshots are saved under each test's tmp dir. `.ci/run` installs chromium and
chromium-driver; without them the tests are skipped here, and fail under CI."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import make_home, start_daemon, wait_for, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("the browser tests need the Debian packages chromium and chromium-driver "
                           "(.ci/run installs them)")
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium must never try to download a driver
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PWNED = "window.__pwned"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Site:
    """A running daemon with its dashboard, and a logged-out browser pointed at it."""

    def __init__(self, tmp_path: Path, watched: Path):
        self.port = free_port()
        self.home = make_home(tmp_path, watched)
        write_config(self.home, watch={"roots": [str(watched)], "own_source": False, "debounce_ms": 100},
                     dashboard={"port": self.port}, shell={"allow": ["echo"]}, tasks={"inbox_poll_s": 0.2})
        self.shots = tmp_path / "screenshots"
        self.shots.mkdir()
        self.proc = start_daemon(self.home)
        token_file = self.home / "run" / "dashboard.token"
        wait_for(lambda: token_file.exists() and self._answers(), 120, 0.2, "the dashboard to answer")
        self.token = token_file.read_text().strip()
        self.driver = _chromium()

    def _answers(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def login(self) -> None:
        self.driver.get(self.url(f"/login?token={self.token}"))
        self.wait(lambda d: d.find_elements(By.ID, "nav"))
        assert "token=" not in self.driver.current_url  # the token never stays in the address bar

    def wait(self, condition, timeout: float = 30):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(condition)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 1000
        return path

    def close(self) -> None:
        self.driver.quit()
        self.proc.terminate()
        assert self.proc.wait(60) == 0


def _chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(DRIVER))


@pytest.fixture
def site(tmp_path: Path, watched: Path):
    s = Site(tmp_path, watched)
    yield s
    s.close()


def _reload_until(site: Site, path: str, css: str, timeout: float = 60):
    """Load `path` again until an element matching `css` is there; return the elements."""
    def found(driver):
        driver.get(site.url(path))
        return driver.find_elements(By.CSS_SELECTOR, css) or False
    return WebDriverWait(site.driver, timeout, poll_frequency=1.0).until(found)


def test_login_change_search_and_task_in_a_real_browser(site: Site, watched: Path):
    site.driver.get(site.url("/"))
    assert site.driver.find_elements(By.ID, "login-form")  # not logged in: the login page
    site.login()
    site.shot("overview")
    (watched / "invoice.py").write_text("def invoice_total(items):\n    return sum(i.price for i in items)\n")
    rows = _reload_until(site, "/changes", ".change-row")
    assert any("invoice.py" in r.text for r in rows)
    site.shot("changes")

    site.driver.get(site.url("/search"))
    query = site.driver.find_element(By.ID, "q")
    query.send_keys("invoice_total")
    site.driver.find_element(By.ID, "search-button").click()
    results = site.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.result"))
    assert "invoice.py" in results[0].text
    site.shot("search")

    site.driver.get(site.url("/tasks"))
    box = site.driver.find_element(By.ID, "task-json")
    box.clear()
    box.send_keys('{"type": "shell", "cmd": ["echo", "hello from the browser"]}')
    site.driver.find_element(By.CSS_SELECTOR, "#task-form [type=submit]").click()
    done = _reload_until(site, "/tasks", '.task-row[data-state="done"]')
    assert "hello from the browser" in done[0].text
    site.shot("tasks")


def test_a_hostile_diff_is_shown_as_text_and_nothing_runs(site: Site, watched: Path):
    site.login()
    hostile = ('title = "<script>window.__pwned = 1</script>"\n'
               'alt = "\\"><img src=x onerror=\\"window.__pwned = 2\\">"\n')
    (watched / "hostile.py").write_text("safe = 1\n")
    _reload_until(site, "/changes", ".change-row")
    (watched / "hostile.py").write_text(hostile)
    rows = _reload_until(site, "/changes?kind=modified", ".change-row")
    link = rows[0].find_element(By.CSS_SELECTOR, "a[href*='/changes/']")
    site.driver.get(link.get_attribute("href"))
    diff = site.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".diff"))[0]
    assert "<script>window.__pwned = 1</script>" in diff.text and "onerror=" in diff.text  # shown, as text
    assert site.driver.execute_script(f"return typeof {PWNED}") == "undefined"
    assert not site.driver.find_elements(By.CSS_SELECTOR, ".diff script, .diff img")
    site.shot("hostile-diff")
    errors = [e["message"] for e in site.driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not [e for e in errors if "Content Security Policy" in e], errors  # nothing even tried to run
