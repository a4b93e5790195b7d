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
    assert not missing, ("README's headline table differs from the results files; it should "
                         "read:\n" + "\n".join(expected))


@pytest.mark.parallel(1)
def test_the_readme_is_short():
    assert len(readme().splitlines()) <= 250


def results_folders():
    base = os.path.join(REPO, "demos", "results")
    return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))


@pytest.mark.parallel(1)
@pytest.mark.parametrize("folder", results_folders())
def test_a_results_folder_says_how_it_was_made(folder):
    path = os.path.join(REPO, "demos", "results", folder)
    with open(os.path.join(path, "results.json")) as f:
        meta = json.load(f)["meta"]
    for key in ("command", "machine", "date"):
        assert meta.get(key), f"{folder}/results.json does not record its {key}"
    with open(os.path.join(path, "README.md")) as f:
        text = f.read()
    assert meta["command"] in text and meta["date"] in text and "rel. L2 (field)" in text


@pytest.mark.parallel(1)
def test_every_results_folder_is_cited():
    """A folder that neither the README's table nor the docs name is a run nobody reads."""
    cited = readme() + open(os.path.join(REPO, "demos", "results", "headline.json")).read()
    for root, _, files in os.walk(os.path.join(REPO, "docs")):
        if "_build" in root:
            continue
        for name in files:
            if name.endswith((".md", ".rst", ".py")):
                with open(os.path.join(root, name)) as f:
                    cited += f.read()
    uncited = [d for d in results_folders() if f"demos/results/{d}" not in cited]
    assert not uncited, f"results folders cited nowhere: {uncited}"


@pytest.mark.parallel(1)
def test_the_main_jobs_time_is_what_its_timing_file_says():
    with open(os.path.join(REPO, "demos", "results", "reaction_diffusion_2_ranks",
                           "wall_time.json")) as f:
        timing = json.load(f)
    assert timing["command"].startswith("scripts/run demo")
    assert f"`scripts/run demo` took {timing['wall_s'] / 60:.1f} minutes on 2 cores" in \
        " ".join(readme().split())
