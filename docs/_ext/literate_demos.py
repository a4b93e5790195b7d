"""Literate demos: each ``demos/<name>.py`` becomes the page ``demos/<name>.rst``.

A demo is a Python script whose comment blocks are reStructuredText (its title and prose) and
whose code is everything else, as Firedrake's demos are written. At ``builder-inited`` every demo
is turned into a page: comment blocks (lines starting with ``#``) become the page's text, the
code between them literal Python blocks. The demos are not run when the docs are built.
"""
import os

DEMOS = ("reaction_diffusion", "diffusion_sorption", "flow_past_obstacle", "decaying_turbulence",
         "nonlinear_poisson", "bratu")


def page(source):
    """The reStructuredText page of a demo script's text: comments at column 0 are text, the
    rest is code."""
    out, code = [], []

    def flush():
        while code and not code[-1].strip():
            code.pop()
        if code:
            out.extend(["", ".. code-block:: python", ""])
            out.extend("   " + line if line.strip() else "" for line in code)
            out.append("")
        code.clear()

    for line in source.splitlines():
        if line.startswith("#!"):
            continue
        if line.startswith("#"):
            flush()
            out.append(line[2:] if line.startswith("# ") else line[1:])
        elif code or line.strip():
            code.append(line)
        else:
            out.append("")
    flush()
    return "\n".join(out) + "\n"


def write_pages(app):
    docs = app.srcdir
    demos = os.path.join(os.path.dirname(docs), "demos")
    target = os.path.join(docs, "demos")
    os.makedirs(target, exist_ok=True)
    for name in DEMOS:
        with open(os.path.join(demos, name + ".py")) as f:
            text = page(f.read())
        path = os.path.join(target, name + ".rst")
        old = open(path).read() if os.path.exists(path) else None
        if old != text:     # rewrite only what changed: Sphinx rebuilds what is newer
            with open(path, "w") as f:
                f.write(text)


def setup(app):
    app.connect("builder-inited", write_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
