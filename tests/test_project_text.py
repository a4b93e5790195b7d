"""The project speaks of what the software is, not of how it was made: no tracked text file
(code, docs, configs, result files) tells its history by work session or tracker number."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written in parts, so that this file does not match itself.
HISTORY = re.compile("|".join([r"sess" + r"ion [0-9]", r"iss" + r"ue [0-9]", r"iss" + r"ue #"]),
                     re.IGNORECASE)
TEXT = (".py", ".md", ".rst", ".toml", ".json", ".yml", ".yaml", ".txt", ".sh", ".cfg")


@pytest.mark.parallel(1)
def test_no_tracked_text_tells_the_projects_history():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    found = []
    for name in files:
        if not (name.endswith(TEXT) or name in ("scripts/run", ".ci/run")):
            continue
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                if HISTORY.search(line):
                    found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "history in the project's text:\n" + "\n".join(found)
