"""Every module of the package has its page in the API reference: a module that ``api.rst``
does not name fails the build (``fem_moe.__main__``, the command line, is documented by its
``--help`` and the training guide)."""
import os
import pkgutil
import re

from sphinx.errors import ExtensionError

EXEMPT = {"fem_moe.__main__"}


def check(app):
    import fem_moe
    modules = {"fem_moe"} | {m.name for m in pkgutil.walk_packages(fem_moe.__path__, "fem_moe.")}
    with open(os.path.join(app.srcdir, "api.rst")) as f:
        documented = set(re.findall(r"^\.\. automodule:: (\S+)", f.read(), re.M))
    missing = sorted(modules - documented - EXEMPT - {"fem_moe"})
    if missing:
        raise ExtensionError(f"api.rst has no page for {', '.join(missing)}")


def setup(app):
    app.connect("builder-inited", check)
    return {"parallel_read_safe": True}
