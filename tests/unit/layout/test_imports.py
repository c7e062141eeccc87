"""The direction of dependencies: the kit knows no service, a service knows only the kit and
itself, an entry point stands alone, and nothing in services/ knows the demo.

Read from the source with `ast`, so a violation fails here before it ties the house in a knot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kit.config import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[3]
RUNNER = ("cli", "registry", "testing")


def imported_modules(source: str) -> Iterator[str]:
    """Every absolute module a source file imports, including `from x import y` as x.y."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def violations(relative: Path, source: str) -> list[str]:
    """What `relative` (a path below the repo root) imports that its place forbids."""
    parts = relative.parts
    if parts[0] != "services" or len(parts) < 3:
        return []
    owner = parts[1]
    found: list[str] = []
    for module in imported_modules(source):
        pieces = module.split(".")
        if pieces[0] == "ballast_demo":
            found.append(f"{relative} imports the demo ({module}); the demo is a client of the suite")
        if pieces[0] != "services" or len(pieces) < 2:
            continue
        target = pieces[1]
        if owner == "kit" and target != "kit":
            found.append(f"{relative} (the kit) imports {module}")
        elif owner in SERVICE_NAMES and target not in ("kit", owner):
            kind = "the runner" if target in RUNNER else "another service"
            found.append(f"{relative} imports {kind}: {module}")
    return found


def _service_files() -> list[Path]:
    return sorted(p.relative_to(ROOT) for p in (ROOT / "services").rglob("*.py"))


def test_the_tree_has_no_backward_imports() -> None:
    problems = [v for path in _service_files() for v in violations(path, (ROOT / path).read_text())]
    assert problems == []


def test_every_service_has_an_entry_point_that_stands_alone() -> None:
    for name in SERVICE_NAMES:
        main = Path("services", name, "__main__.py")
        modules = set(imported_modules((ROOT / main).read_text()))
        assert f"services.{name}.app.ENTRY" in modules, main
        assert not any(m.startswith(("services.cli", "services.registry")) for m in modules), main


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("services/kit/server.py", "from services.edge.app import build\n", "(the kit) imports"),
        ("services/kit/x.py", "import services.registry\n", "(the kit) imports"),
        ("services/edge/edge.py", "from services.router import gateway\n", "another service"),
        ("services/limiter/__main__.py", "from services.cli import serve_one\n", "the runner"),
        ("services/cache/x.py", "from ballast_demo.load import run_surge\n", "the demo"),
    ],
)
def test_the_check_catches_each_kind_of_violation(path: str, source: str, expected: str) -> None:
    found = violations(Path(path), source)
    assert found and expected in found[0]


def test_the_check_allows_what_the_layout_allows() -> None:
    allowed = "from services.kit.server import ServiceApp\nfrom services.edge.edge import x\nimport grpc\n"
    assert violations(Path("services/edge/app.py"), allowed) == []
    assert violations(Path("services/cli.py"), "from services.edge.app import ENTRY\n") == []


PLOTTING = ("matplotlib", "plotly", "seaborn", "bokeh")


def test_the_services_install_without_plotting_and_the_image_without_the_demo() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(PLOTTING)]
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["demo"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ballast_demo" not in dockerfile
    assert "pip install -c constraints.txt ." in dockerfile  # no extras in the production image


def test_test_files_have_one_naming_scheme() -> None:
    # pytest collects only test_*.py (pyproject.toml): a file named otherwise would silently not run.
    stray = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if p.name.endswith("_test.py") or (p.name.startswith("tests_"))
    )
    assert stray == []


# One name for one role in every service (docs/architecture.md): the reader who found the
# limiter's domain logic in limiter.py guesses router.py in the router.
ROLES = ("__main__.py", "app.py", "config.py", "servicer.py", "README.md")


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_each_service_names_its_roles_alike(name: str) -> None:
    folder = ROOT / "services" / name
    missing = [role for role in (*ROLES, f"{name}.py", "store/base.py") if not (folder / role).is_file()]
    assert missing == [], f"services/{name} lacks {missing}"
