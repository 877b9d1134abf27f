"""Installs an app's requirements for a component: `python install_requirements.py
REQUIREMENTS DIR` (guests/python/build runs it with its virtualenv's Python).

pip installs them into a fresh directory next to DIR, which becomes DIR only once every package
in it can run in a component, so DIR, once there, is complete and is reused as it is: a rebuild
downloads nothing. componentize-py runs CPython compiled to WebAssembly, which loads no native
code, so a package that brings a C extension (`*.so`, `*.pyd`) is refused, by name, unless its
extension only speeds up Python code it also ships (PURE_FALLBACKS): then the extension is
dropped.

pip runs on the build's Python, not the component's (3.14), so environment markers in the
requirements are read for the former: pin what the app needs.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Packages whose C extension is optional, and the stem of its files: without them the package
# uses its own Python implementation (MarkupSafe's `_speedups` falls back to `_native`).
PURE_FALLBACKS = {"markupsafe": "markupsafe/_speedups"}

EXTENSION_SUFFIXES = (".so", ".pyd")


def main() -> int:
    requirements, target = Path(sys.argv[1]), Path(sys.argv[2])
    # A directory of this build's own: another build may be installing the same file.
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    # --no-compile: the bytecode would be for this Python, not the component's.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", "--target", str(staging), "-r", str(requirements)]
    )
    if install.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"guests/python/build: pip could not install {requirements} (above)",
              file=sys.stderr)
        return 1
    refused = []
    for package, files in extensions_by_package(staging).items():
        stem = PURE_FALLBACKS.get(normalized(package))
        if stem is not None and all(file.startswith(stem) for file in files):
            for file in files:
                (staging / file).unlink()
        else:
            refused.append(f"  {package}: {', '.join(sorted(files))}")
    if refused:
        shutil.rmtree(staging)
        print(
            "guests/python/build: these requirements need C extensions, which a component cannot"
            " load (it runs CPython compiled to WebAssembly); use pure-Python packages instead:\n"
            + "\n".join(refused),
            file=sys.stderr,
        )
        return 1
    shutil.rmtree(staging / "bin", ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging)  # the other build finished first: its directory is the same
    return 0


def extensions_by_package(directory: Path) -> dict:
    """The extension files under `directory` (paths relative to it), by the distribution that
    installed them (as its dist-info names it), or by their own path when none did."""
    owners = {}
    for record in directory.glob("*.dist-info/RECORD"):
        package = distribution_name(record.parent)
        for line in record.read_text().splitlines():
            owners[line.split(",", 1)[0]] = package
    found = {}
    for path in directory.rglob("*"):
        if path.is_file() and is_extension(path.name):
            file = path.relative_to(directory).as_posix()
            found.setdefault(owners.get(file, file), []).append(file)
    return found


def is_extension(name: str) -> bool:
    # `_speedups.cpython-311-x86_64-linux-gnu.so`, `x.pyd`, and shared libraries a wheel
    # bundles for its extension (`libfoo.so.1`).
    return name.endswith(EXTENSION_SUFFIXES) or ".so." in name


def distribution_name(dist_info: Path) -> str:
    """`Name version`, as the dist-info directory `name-version.dist-info` says it."""
    metadata = dist_info / "METADATA"
    lines = metadata.read_text(errors="replace").splitlines() if metadata.is_file() else []
    stem = dist_info.name.removesuffix(".dist-info")
    name = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("Name:")),
        stem.split("-", 1)[0],
    )
    return f"{name} {stem.split('-', 1)[-1]}"


def normalized(package: str) -> str:
    return package.split(" ", 1)[0].lower().replace("-", "_")


if __name__ == "__main__":
    sys.exit(main())
