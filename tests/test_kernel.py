"""The kernel: real patches on real files, a real verify process, byte-exact rollback."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from agent_core.kernel import Kernel, PatchRefused, apply_hunks, parse_patch
from agent_core.snapshot import DELETED_SHA, Snapshots
from config.settings import load_settings
from self_mutation_watcher.diff_engine import sha256_bytes
from tests.conftest import make_home, write_config

CALC = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
# The verify command: the module must still add correctly (run in the root, no bytecode written).
VERIFY = [sys.executable, "-B", "-c", "import calc, sys; sys.exit(0 if calc.add(2, 3) == 5 else 3)"]

GOOD = """\
--- a/calc.py
+++ b/calc.py
@@ -3,4 +3,8 @@


 def sub(a, b):
     return a - b
+
+
+def mul(a, b):
+    return a * b
"""

BREAKING = """\
diff --git a/calc.py b/calc.py
index 1111111..2222222 100644
--- a/calc.py
+++ b/calc.py
@@ -1,2 +1,2 @@
 def add(a, b):
-    return a + b
+    return a - b
"""


def tree_state(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under `root` (bytecode caches aside): (bytes, permission bits)."""
    out = {}
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            path = Path(top, name)
            if not path.is_symlink():
                out[str(path.relative_to(root))] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return out


def folders(root: Path) -> set[str]:
    return {str(Path(top).relative_to(root)) for top, _, _ in os.walk(root)} - {"."}


@pytest.fixture
def home(tmp_path: Path, watched: Path) -> Path:
    """A home whose verify command imports calc.py from the watched folder."""
    home = make_home(tmp_path, watched)
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 shell={"allow": [sys.executable]}, mutation={"verify": VERIFY, "verify_timeout_s": 60})
    return home


@pytest.fixture
def project(watched: Path) -> Path:
    (watched / "calc.py").write_text(CALC)
    (watched / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(watched / "tool.sh", 0o750)
    return watched


@pytest.fixture
def kernel(settings, store) -> Kernel:
    k = Kernel(settings, store)
    yield k
    k.snapshots.close()


def test_a_good_patch_is_kept_and_announced(kernel, store, project):
    result = kernel.apply(GOOD)
    expected = CALC + "\n\ndef mul(a, b):\n    return a * b\n"
    assert (project / "calc.py").read_text() == expected
    assert result.kept and result.reason == "verify passed" and result.restored_identical is None
    assert result.verify["exit_code"] == 0 and result.verify["argv"] == VERIFY
    assert result.files == (str(project / "calc.py"),) and result.root == str(project)
    assert store.is_own_write(str(project / "calc.py"), sha256_bytes(expected.encode()))
    snap = kernel.snapshots.get(result.snapshot)
    assert snap.partial and snap.files == 1  # the touched file, as it was
    assert result.to_dict()["kept"] is True


def test_a_patch_that_breaks_verify_is_rolled_back_byte_identical(kernel, project):
    os.chmod(project / "calc.py", 0o640)
    before = (project / "calc.py").read_bytes()
    result = kernel.apply(BREAKING)
    assert not result.kept and result.restored_identical is True
    assert result.verify["exit_code"] == 3 and "exited with code 3" in result.reason
    assert (project / "calc.py").read_bytes() == before
    assert sha256_bytes((project / "calc.py").read_bytes()) == sha256_bytes(before)
    assert stat.S_IMODE((project / "calc.py").stat().st_mode) == 0o640
    # the broken version was really on disk while verify ran: the restore's undo snapshot holds it
    undo = kernel.snapshots.list(1)[0]
    broken = kernel.snapshots.files(undo.id)[project / "calc.py"]
    assert b"return a - b" in kernel.snapshots._blob(broken.blob)


def test_check_plans_without_touching(kernel, project):
    before = tree_state(project)
    [change] = kernel.check(BREAKING)
    assert (change.path, change.action, change.root) == (project / "calc.py", "modify", project)
    assert change.new == CALC.replace("a + b", "a - b").encode() and change.old == CALC.encode()
    assert tree_state(project) == before and kernel.snapshots.list() == []


def _outside_setup(tmp_path: Path, project: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("SECRET = 1\n")
    (project / "escape").symlink_to(outside, target_is_directory=True)
    (project / "link.py").symlink_to(outside / "secret.py")
    (project / ".git").mkdir()
    (project / ".git" / "config").write_text("[core]\n")
    (project / "logo.png").write_bytes(b"\x89PNG\0\0\0binary\n")


def _modify(name: str, old: str = "SECRET = 1", new: str = "SECRET = 2") -> str:
    return f"--- a/{name}\n+++ b/{name}\n@@ -1 +1 @@\n-{old}\n+{new}\n"


REFUSED = {
    "traversal": (_modify("../outside/secret.py"), "'..' components"),
    "absolute": ("--- {outside}/secret.py\n+++ {outside}/secret.py\n@@ -1 +1 @@\n-SECRET = 1\n+SECRET = 2\n",
                 "absolute paths"),
    "symlinked folder": (_modify("escape/secret.py"), "outside the watched root"),
    "symlinked file": (_modify("link.py"), "symbolic link"),
    "git internals": (_modify(".git/config", "[core]", "[evil]"), "not a watched file"),
    "git binary patch": ("diff --git a/logo.png b/logo.png\nindex 1111111..2222222 100644\nGIT binary patch\n"
                         "literal 5\nMcmZ?wbhEOO00\n\nliteral 0\nHcmV?d00001\n\n", "binary"),
    "binary files differ": ("diff --git a/logo.png b/logo.png\nindex 1111111..2222222 100644\n"
                            "Binary files a/logo.png and b/logo.png differ\n", "binary"),
    "binary target": (_modify("logo.png", "\x89PNG", "PNG"), "binary file"),
    "context mismatch": (_modify("calc.py", "def add(x, y):", "def add(a, b, c):"), "hunk 1"),
    "fuzz": ("--- a/calc.py\n+++ b/calc.py\n@@ -1,3 +1,3 @@\n def add(a,  b):\n-    return a + b\n"
             "+    return b + a\n \n", "does not apply"),
    "missing file": (_modify("nope.py"), "does not exist"),
    "new file exists": ("--- /dev/null\n+++ b/calc.py\n@@ -0,0 +1 @@\n+x = 1\n", "already exists"),
    "delete differs": ("--- a/calc.py\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-def add(a, b):\n-    return a + b\n",
                       "content differs"),
    "rename": ("--- a/calc.py\n+++ b/other.py\n@@ -1 +1 @@\n-def add(a, b):\n+def add(x, y):\n", "renames"),
    "empty": ("  \n", "empty"),
    "not a diff": ("please apply my change to calc.py\n", "names no file"),
    "malformed": ("--- a/calc.py\n+++ b/calc.py\n@@ -1,5 +1,5 @@\n-only one line\n", "not a valid unified diff"),
    "twice": (_modify("calc.py", "def add(a, b):", "def add(x, y):") * 2, "appears twice"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsafe_or_non_applying_patches_are_refused_and_change_nothing(kernel, project, tmp_path, case):
    _outside_setup(tmp_path, project)
    patch, words = REFUSED[case]
    patch = patch.replace("{outside}", str(tmp_path / "outside"))
    before, outside = tree_state(project), tree_state(tmp_path / "outside")
    with pytest.raises(PatchRefused, match=words):
        kernel.apply(patch)
    assert tree_state(project) == before and tree_state(tmp_path / "outside") == outside
    assert kernel.snapshots.list() == []  # refused before anything was done


def test_an_oversized_patch_is_refused(tmp_path, watched, project):
    home = make_home(tmp_path, watched)
    write_config(home, watch={"roots": [str(watched)], "own_source": False}, mutation={"max_patch_bytes": 64})
    with pytest.raises(PatchRefused, match="max_patch_bytes"):
        Kernel(load_settings(home), None).check(GOOD)
    assert (project / "calc.py").read_text() == CALC


NEW_AND_DELETE = """\
diff --git a/tool.sh b/tool.sh
deleted file mode 100755
index 1111111..0000000
--- a/tool.sh
+++ /dev/null
@@ -1,2 +0,0 @@
-#!/bin/sh
-echo tool
diff --git a/lib/deep/helper.py b/lib/deep/helper.py
new file mode 100755
index 0000000..3333333
--- /dev/null
+++ b/lib/deep/helper.py
@@ -0,0 +1,2 @@
+def helper():
+    return 42
\\ No newline at end of file
"""


def test_new_and_deleted_files_apply_when_verify_passes(kernel, store, project):
    result = kernel.apply(NEW_AND_DELETE)
    assert result.kept
    helper = project / "lib" / "deep" / "helper.py"
    assert helper.read_bytes() == b"def helper():\n    return 42"  # no newline at the end, as the patch says
    assert stat.S_IMODE(helper.stat().st_mode) == 0o755
    assert not (project / "tool.sh").exists()
    assert store.is_own_write(str(project / "tool.sh"), DELETED_SHA)
    assert store.is_own_write(str(helper), sha256_bytes(helper.read_bytes()))


def test_new_and_deleted_files_roll_back_exactly(kernel, project):
    before, dirs = tree_state(project), folders(project)
    failing = [sys.executable, "-B", "-c", "import os, sys; sys.exit(0 if os.path.exists('tool.sh') else 4)"]
    result = kernel.apply(NEW_AND_DELETE, verify=failing)
    assert not result.kept and result.restored_identical is True and result.verify["exit_code"] == 4
    assert tree_state(project) == before  # tool.sh back with mode 0750, helper.py gone
    assert folders(project) == dirs  # and the folders made for it too


NO_NEWLINE = """\
--- a/notes.txt
+++ b/notes.txt
@@ -1,2 +1,3 @@
 first
-second
\\ No newline at end of file
+second
+third
\\ No newline at end of file
"""


def test_lines_without_a_final_newline_are_matched_and_written_exactly(kernel, project):
    (project / "notes.txt").write_bytes(b"first\nsecond")
    assert kernel.apply(NO_NEWLINE, verify=[]).kept
    assert (project / "notes.txt").read_bytes() == b"first\nsecond\nthird"
    (project / "notes.txt").write_bytes(b"first\nsecond\n")  # now it has the newline the patch says it lacks
    with pytest.raises(PatchRefused, match="does not apply"):
        kernel.check(NO_NEWLINE)


def test_hunks_apply_at_an_offset_but_without_fuzz(kernel, project):
    (project / "calc.py").write_text("# header\n# more header\n" + CALC)
    result = kernel.apply(BREAKING, verify=[])  # says line 1, the lines now start at line 3
    assert result.kept and "return a - b" in (project / "calc.py").read_text()
    assert result.reason.startswith("kept without verification")


def test_a_refused_verify_command_rolls_back(kernel, project):
    before = tree_state(project)
    result = kernel.apply(GOOD, verify=["/bin/sh", "-c", "true"])  # not in [shell] allow
    assert not result.kept and result.verify is None and result.restored_identical is True
    assert "verify could not run" in result.reason and "not allowed" in result.reason
    assert tree_state(project) == before


def test_a_cancelled_verify_rolls_back(kernel, project):
    before = tree_state(project)
    stop = threading.Event()
    stop.set()
    slow = [sys.executable, "-B", "-c", "import time; time.sleep(1.5)"]
    result = kernel.apply(GOOD, verify=slow, stop=stop)
    assert not result.kept and result.verify["cancelled"] and "cancelled" in result.reason
    assert tree_state(project) == before


def test_the_root_where_the_patch_applies_is_chosen(tmp_path, watched, project):
    other = tmp_path / "other"
    other.mkdir()
    (other / "calc.py").write_text("unrelated\n")
    home = make_home(tmp_path, watched)
    write_config(home, watch={"roots": [str(other), str(watched)], "own_source": False})
    settings = load_settings(home)
    kernel = Kernel(settings, None, Snapshots(settings))
    [change] = kernel.check(BREAKING)
    assert change.root == watched
    with pytest.raises(PatchRefused, match="under no watched root") as refused:
        kernel.check(_modify("calc.py", "nothing like this", "x"))
    assert str(other) in str(refused.value) and str(watched) in str(refused.value)


def test_apply_hunks_is_exact_about_bytes():
    [fp] = parse_patch("--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\r\n-b\r\n+c\r\n", 10_000)
    assert apply_hunks(b"a\r\nb\r\n", fp.hunks, "f") == b"a\r\nc\r\n"
    with pytest.raises(PatchRefused):
        apply_hunks(b"a\nb\n", fp.hunks, "f")  # line endings differ: no match


def test_git_quoted_non_utf8_names_are_patched_by_their_bytes(kernel, project):
    odd = project / os.fsdecode(b"caf\xe9.txt")
    odd.write_bytes(b"old\n")
    patch = '--- "a/caf\\351.txt"\n+++ "b/caf\\351.txt"\n@@ -1 +1 @@\n-old\n+new\n'
    assert kernel.apply(patch, verify=[]).kept
    assert odd.read_bytes() == b"new\n"
