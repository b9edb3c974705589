"""Gremlin's own logs: one JSON object a line, whatever a file name holds."""

from __future__ import annotations

import json
import logging
import os

from agent_core.logs import configure_logging


def test_an_undecodable_file_name_is_logged_escaped_not_lost(settings, capsys):
    system = configure_logging(settings, console=True)
    try:
        path = os.fsdecode(b"/srv/caf\xe9\n.py")
        logging.getLogger("gremlin.test").warning("cannot read file, skipping it", extra={"path": path})
        logging.getLogger("gremlin.audit").info("mutation stored", extra={"path": path})
    finally:
        configure_logging(settings, console=False, files=False)
    records = [json.loads(line) for line in (system / "gremlin.log").read_text("utf-8").splitlines()]
    assert records[-1]["path"] == "/srv/caf\\xe9\n.py" and records[-1]["msg"] == "cannot read file, skipping it"
    audit = json.loads((system / "bootstrap.log").read_text("utf-8").splitlines()[-1])
    assert audit["path"] == "/srv/caf\\xe9\n.py"
    err = capsys.readouterr().err
    assert "Logging error" not in err and "path=/srv/caf\\xe9\\n.py" in err
