"""Tables read from the committed results files when the docs are built, so that every number on
a page is the file's.

    ```{results-table} benchmarks/results/coupled_step.json
    :columns: layer=layer, seconds=s/step:{:.3f}, iterations=iterations:{:.1f}
    :where: pde=reaction_diffusion
    ```

``columns``: ``key=header`` or ``key=header:format`` (a Python format; ``{:.2%}`` for a percentage),
comma separated; a missing value prints as "-". ``where``: ``key=value`` pairs a row must match
(compared as text). Below the table, the command that made the file, the machine and the date,
from the file's ``meta`` (or top level). A file, column or filter that matches nothing is a build
error, so a table cannot silently go stale.
"""
import json
import os

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.errors import ExtensionError

_PROVENANCE = {"command", "machine", "cpus", "python", "date", "commit", "title", "torch", "mpi"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pairs(text, sep):
    out = []
    for item in filter(None, (part.strip() for part in (text or "").split(sep))):
        key, _, value = item.partition("=")
        out.append((key.strip(), value.strip()))
    return out


class ResultsTable(Directive):
    required_arguments = 1
    option_spec = {"columns": directives.unchanged_required, "where": directives.unchanged}

    def run(self):
        path = self.arguments[0]
        full = os.path.join(REPO, path)
        self.state.document.settings.record_dependencies.add(full)
        try:
            with open(full) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ExtensionError(f"results-table: cannot read {path}: {e}") from e
        rows = doc["rows"] if isinstance(doc, dict) else doc
        meta = doc.get("meta", doc) if isinstance(doc, dict) else {}
        where = _pairs(self.options.get("where"), ",")
        rows = [r for r in rows if all(str(r.get(k)) == v for k, v in where)]
        if not rows:
            raise ExtensionError(f"results-table: no row of {path} matches {where}")
        columns = []
        for key, spec in _pairs(self.options["columns"], ","):
            header, _, fmt = spec.partition(":")
            if not any(key in r for r in rows):
                raise ExtensionError(f"results-table: {path} has no column {key!r}")
            columns.append((key, header or key, fmt or "{}"))
        table = nodes.table()
        group = nodes.tgroup(cols=len(columns))
        table += group
        group.extend(nodes.colspec(colwidth=1) for _ in columns)
        head, body = nodes.thead(), nodes.tbody()
        group += head
        group += body
        head += self._row([h for _, h, _ in columns])
        for r in rows:
            body += self._row(["-" if r.get(k) is None else fmt.format(r[k])
                               for k, _, fmt in columns])
        caption = nodes.paragraph()
        caption += nodes.literal(text=path)
        if meta.get("command"):
            caption += nodes.Text(", made by ")
            caption += nodes.literal(text=meta["command"])
        else:       # older files record the script's options, not the command line
            options = ", ".join(f"{k} = {v}" for k, v in meta.items() if k not in _PROVENANCE
                                and isinstance(v, (int, float, str)) and len(str(v)) < 40)
            caption += nodes.Text(f", options {options}" if options else "")
        where = ", ".join(str(meta[k]) for k in ("machine", "date") if meta.get(k))
        caption += nodes.Text(f" ({where})." if where else ".")
        return [table, caption]

    @staticmethod
    def _row(cells):
        row = nodes.row()
        for text in cells:
            entry = nodes.entry()
            entry += nodes.paragraph(text=str(text))
            row += entry
        return row


def setup(app):
    app.add_directive("results-table", ResultsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
