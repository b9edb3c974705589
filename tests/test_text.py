"""What the model sees of a memory: diffs reduced to files, hunk context and changed lines."""

from __future__ import annotations

from memory.text import embedding_text

GIT_DIFF = """Fix the retry limit

diff --git a/src/worker.py b/src/worker.py
index 3b18e51..a9c2d7f 100644
--- a/src/worker.py
+++ b/src/worker.py
@@ -10,7 +10,7 @@ def run_jobs(queue):
     for job in queue:
         start(job)
-    RETRIES = 3
+    RETRIES = 5
     finish()
"""


def test_a_git_diff_keeps_files_context_and_changed_lines_only():
    assert embedding_text(GIT_DIFF) == (
        "Fix the retry limit\n\nfile src/worker.py\nin def run_jobs(queue):\n-    RETRIES = 3\n+    RETRIES = 5")


def test_a_watcher_diff_keeps_its_header_line():
    text = "modified app/settings.py\n--- a/settings.py\n+++ b/settings.py\n@@ -1,2 +1,2 @@\n TIMEOUT = 30\n-RETRIES = 3\n+RETRIES = 4"
    assert embedding_text(text) == "modified app/settings.py\n-RETRIES = 3\n+RETRIES = 4"


def test_text_without_a_diff_passes_through():
    traceback = 'failure in app.log: ValueError: bad\nTraceback (most recent call last):\n  File "a.py", line 3'
    assert embedding_text(traceback) == traceback
    assert embedding_text("") == ""
