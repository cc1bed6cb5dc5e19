"""The package's declared public API is importable and documented."""

from __future__ import annotations

import inspect

import pdsupervisord


def test_every_export_exists_and_has_a_docstring() -> None:
    assert len(set(pdsupervisord.__all__)) == len(pdsupervisord.__all__)
    for name in pdsupervisord.__all__:
        value = getattr(pdsupervisord, name)
        if name != "__version__":
            assert inspect.getdoc(value), f"{name} has no docstring"


def test_star_import_gives_exactly_the_exports() -> None:
    namespace: dict[str, object] = {}
    exec("from pdsupervisord import *", namespace)
    exported = {name for name in namespace if name != "__builtins__"}
    assert exported == set(pdsupervisord.__all__)
