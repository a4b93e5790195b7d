"""The README holds: its snippet runs as written (serially and on 2 ranks), its headline table
is what the results files say, and it stays short."""
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def readme():
    with open(README) as f:
        return f.read()


@pytest.mark.parallel([1, 2])
def test_the_readme_snippet_runs_as_written():
    (snippet, *_) = re.findall(r"```python\n(.*?)```", readme(), re.S)
    namespace = {"__name__": "readme"}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["loss"].item() >= 0 and len(namespace["problem"].function(namespace["u"])) == 1


def headline_rows():
    """The headline table's rows as the results files give them (demos/results/headline.json)."""
    with open(os.path.join(REPO, "demos", "results", "headline.json")) as f:
        spec = json.load(f)
    lines = []
    for row in spec["rows"]:
        cells = []
        for column in ("soft", "pihc", "moe"):
            cell = row[column]
            if cell is None:
                cells.append("–")
                continue
            with open(os.path.join(REPO, cell["results"], "results.json")) as f:
                (found,) = [r for r in json.load(f)["rows"] if r["label"] == cell["label"]]
            cells.append(f"[{100 * found[row['metric']]:.2f} %]({cell['results']})")
        lines.append(f"| {row['demo']} | " + " | ".join(cells)
                     + f" | {row['paper'] or '–'} | `{row['metric']}` |")
    return lines


@pytest.mark.parallel(1)
def test_the_headline_table_is_what_the_results_files_say():
    text = readme().splitlines()
    expected = headline_rows()
    missing = [line for line in expected if line not in text]
    assert not missing, "README's headline table differs from the results files; it should read:\n" \
        + "\n".join(expected)


@pytest.mark.parallel(1)
def test_the_readme_is_short():
    assert len(readme().splitlines()) <= 250
