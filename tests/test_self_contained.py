"""The repository carries everything it needs: no tracked file refers to a place outside it.

A fresh clone anywhere must pass `make test`, so code, tests, benchmarks, scripts, the Makefile
and the docs may not read or name the folder the project was developed beside (its captured
fixtures now live in tests/fixtures), nor an absolute path of one machine.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from helpers import TOOL_PACKAGES

REPO = Path(__file__).resolve().parents[1]

# The folder the project was developed beside, named once: this file describes references to it
# and so must not hold one itself.
BESIDE = "shared"

# What a reference to the outside looks like.  The lookbehinds keep paths inside a longer path
# (`workdir=/rw/work/`, `<pid>/root/`) and words such as "kpod_shared/" from matching.
OUTSIDE = re.compile(
    rf"\.\./{BESIDE}\b"  # the folder beside the repository
    rf"|(?<![\w/.-]){BESIDE}/(?:fixtures|notes|hooks|seed|README)"  # ... named by its content
    r"|KPOD_SHARED"  # the variable that pointed the tests at it
    r"|(?<![\w.>)-])/(?:work|home|root)/"  # absolute paths of a development machine
)

THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name]


def references_outside(text: str, own_paths: tuple[str, ...]) -> list[str]:
    found = [match.group(0) for match in OUTSIDE.finditer(text)]
    return found + [path for path in own_paths if path in text]


def test_no_tracked_file_refers_outside_the_repository() -> None:
    # Where this checkout happens to be: no file may name it (a fresh clone is elsewhere).
    own_paths = (str(REPO) + "/", str(REPO.parent) + "/") if REPO.parent != Path("/") else (str(REPO) + "/",)
    offenders = {}
    files = tracked_files()
    assert len(files) > 100, files  # git answered with the repository, not with nothing
    for name in files:
        if name == THIS_FILE:
            continue
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the work tree and not yet committed
        for number, line in enumerate(text.splitlines(), 1):
            if found := references_outside(line, own_paths):
                offenders[f"{name}:{number}"] = found
    assert offenders == {}


def test_the_check_catches_each_kind_of_reference() -> None:
    """The pattern above is the test; show it matches what it must and spares what it must."""
    own = ("/srv/checkout/kpod/", "/srv/checkout/")
    for line in (
        f'FIXTURES = REPO.parent / "{BESIDE}" / "fixtures"  # ../{BESIDE}/fixtures',
        f"see {BESIDE}/fixtures/README.md, surprise 1",
        f"({BESIDE}/notes/anchors.md)",
        'os.environ.get("KPOD_SHARED_FIXTURES")',
        f'FIXTURE = "/work/{BESIDE}/fixtures/cgroup-v2-kernel-6.1"',
        "open('/root/kc.yaml')",
        "/srv/checkout/kpod/tests/fixtures",
    ):
        assert references_outside(line, own), line
    for line in (
        "overlay rw,lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work",
        "statvfs(<proc_root>/<pid>/root/<mountpoint>)",
        "45 42 0:24 / / rw shared:2 - overlay",
        "tests/fixtures/README.md",
    ):
        assert not references_outside(line, own), line


def test_every_tool_the_tests_require_is_installed_by_make_setup() -> None:
    """require_tools fails a test when a tool is missing; that is fair only for tools that
    `make setup` installs.  (make itself runs `make setup`, so it is there already.)"""
    makefile = (REPO / "Makefile").read_text()

    def variable(name: str) -> set[str]:
        match = re.search(rf"^{name}\s*:=((?:.*\\\n)*.*)$", makefile, flags=re.M)
        assert match, f"no {name} in the Makefile"
        words = match.group(1).replace("\\\n", " ").split()
        # $(OTHER) references expand to that variable's words.
        return {w for word in words for w in (variable(word[2:-1]) if word.startswith("$(") else {word})}

    packages = variable("APT_PACKAGES")
    required = {package for tool, package in TOOL_PACKAGES.items() if tool != "make"}
    assert required <= packages, sorted(required - packages)


def test_test_modules_do_not_import_each_other() -> None:
    """Shared test code lives in the support modules (tests/README.md), not in a test module."""
    offenders = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported = [name for name in names if name.split(".")[-1].startswith("test_")]
        if imported:
            offenders[str(path.relative_to(REPO))] = imported
    assert offenders == {}
