"""Imports, while the component is built, what the app would otherwise import only while it
serves a request.

componentize-py keeps the interpreter's memory as it is once the entry module has run, and
nothing else: at run time there are no files to import from, so an import the app (or a
package it uses) first makes inside a function fails with ModuleNotFoundError, and a text
codec first looked up by name (`"example.com".encode("idna")`, as Werkzeug does) with
LookupError. So after the app is imported, every module named by an `import` anywhere in the
code loaded from outside the standard library (the app's and its requirements', functions
included) is imported too, again for the modules that brings in, until nothing new comes; a
module that fails to import (an optional dependency that is not installed) is skipped. Imports
under `if TYPE_CHECKING:` and `if __name__ == "__main__":` are left out: they never run in a
server. The standard library's own lazy imports are not followed (they would bring in most of
it): the codecs and the one module apps commonly reach that way are listed below.
"""

import ast
import importlib
import importlib.util
import sys
import warnings

# Codecs looked up by name at run time: the Unicode ones, those HTTP and URL handling use, and
# the ones Python code names for bytes (`codecs.encode(data, "hex")`). Each of the others costs
# memory (a charmap table) for an encoding few apps see.
CODECS = [
    "ascii", "latin_1", "cp1252", "utf_8", "utf_8_sig", "utf_16", "utf_16_le", "utf_16_be",
    "utf_32", "utf_32_le", "utf_32_be", "idna", "punycode", "unicode_escape",
    "raw_unicode_escape", "base64_codec", "hex_codec",
]
# datetime.strptime and time.strptime import it when first called.
STANDARD_LAZY = ["_strptime"]
# Modules (with their submodules) that code imports only in functions a server in a component
# never calls: what needs sockets, processes, threads, a terminal or a browser (a component has
# none of them), developer tools, and the development server, debugger, reloader and test
# clients of Werkzeug, Flask and click. They would cost a Flask app about 4 MiB of memory in
# every instance.
NEVER_SERVING = (
    "asyncio", "concurrent", "ftplib", "http.server", "imaplib", "multiprocessing", "poplib",
    "smtplib", "socketserver", "subprocess", "urllib.request", "webbrowser", "xmlrpc", "pty",
    "tty", "termios", "readline", "curses", "tkinter",
    "bdb", "cmd", "code", "codeop", "doctest", "idlelib", "pdb", "py_compile", "compileall",
    "pydoc", "pydoc_data", "unittest",
    "werkzeug.debug", "werkzeug.serving", "werkzeug._reloader", "werkzeug.test",
    "flask.testing", "flask.cli", "click.testing", "click.shell_completion",
)


def preload() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [f"encodings.{codec}" for codec in CODECS] + STANDARD_LAZY:
            try_import(name)
        done = set()
        while pending := sorted(set(sys.modules) - done):
            for name in pending:
                done.add(name)
                module = sys.modules.get(name)
                path = getattr(module, "__file__", None) or ""
                standard = name.partition(".")[0] in sys.stdlib_module_names
                if path.endswith(".py") and not standard:
                    for imported in imported_names(module, path):
                        if not loaded(imported) and not never_serving(imported):
                            try_import(imported)


def loaded(name: str) -> bool:
    """Whether `name` is imported, or is already something else its parent holds (`from
    package import function`): importing a submodule of that name would replace it."""
    if name in sys.modules:
        return True
    parent, _, child = name.rpartition(".")
    try:
        return parent in sys.modules and hasattr(sys.modules[parent], child)
    except Exception:  # a module __getattr__ that fails: leave it alone
        return True


def never_serving(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in NEVER_SERVING)


def try_import(name: str) -> None:
    try:
        importlib.import_module(name)
    except BaseException:  # an optional dependency that is missing, or fails on import
        pass


def imported_names(module, path: str) -> list:
    """The modules `module`'s source imports (and, for `from package import name`, the
    submodule `package.name`, which may be one)."""
    try:
        with open(path, "rb") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, ValueError):
        return []
    finder = ImportFinder(module.__package__ or "")
    finder.visit(tree)
    return finder.names


class ImportFinder(ast.NodeVisitor):
    def __init__(self, package: str):
        self.package = package
        self.names = []

    def visit_If(self, node: ast.If) -> None:
        if never_runs_in_a_server(node.test):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.extend(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        try:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), self.package)
        except (ImportError, ValueError):
            return
        self.names.append(base)
        self.names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def never_runs_in_a_server(test: ast.expr) -> bool:
    """`TYPE_CHECKING`, `typing.TYPE_CHECKING` or `__name__ == "__main__"`."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )
