"""A baseline checkout's requirements: which of them this environment does not satisfy, so the
benchmark installs those for the baseline alone."""

from __future__ import annotations

from importlib import metadata

from bench.support import unmet_requirements


def test_missing_and_excluded_versions_are_unmet_and_other_platforms_skipped() -> None:
    grpcio = metadata.version("grpcio")
    pyproject = f"""
[project]
name = "old-ballast"
dependencies = [
    "grpcio>=1",
    "grpcio=={grpcio}",
    "surely-no-such-package-here>=1",
    "grpcio<0.1",
    "pywin32>=300; sys_platform == 'win32'",
]
"""
    assert unmet_requirements(pyproject) == ["surely-no-such-package-here>=1", "grpcio<0.1"]


def test_a_pyproject_without_dependencies_needs_nothing() -> None:
    assert unmet_requirements('[project]\nname = "x"\n') == []
    assert unmet_requirements("") == []
