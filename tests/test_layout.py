"""The layout rules: dependencies point one way and modules stay small.

Pipelines build on the gateway, so nothing under ``gateway/`` imports ``pipelines``
(built-in pipelines are named by import strings, imported only when enabled). The
sans-I/O transcription modules do not import the engine (and with it faster-whisper).
``gateway.speakers`` and ``gateway.voice`` are old names kept for code outside this
repository; inside it, everything imports from ``gateway.ingest`` and ``gateway.speech``.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).parent.parent
MAX_LINES = 400
ENGINE = "pipelines.transcription.engine"
#: Modules of ``pipelines/transcription/`` that must not import its engine.
PURE = ("policy.py", "window.py", "turns.py", "verdicts.py")
#: Modules that moved, by old name: the old name re-exports the new home's public names.
SHIMS = {"gateway.speakers": "gateway.ingest.speakers", "gateway.voice": "gateway.speech.voice"}


def modules(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, f"no modules under {package}/"
    return found


def package_of(path: Path) -> str:
    """The dotted package a module's relative imports start from."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def imports(source: str, package: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, those in functions included.

    Relative imports are resolved against ``package``. ``from m import n`` gives both
    ``m`` and ``m.n`` (``n`` may be a submodule).
    """
    parts = package.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offending(paths: list[Path], forbidden: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in paths
        for line, module in imports(path.read_text(), package_of(path))
        if within(module, forbidden)
    ]


def test_the_gateway_never_imports_pipelines() -> None:
    assert offending(modules("gateway"), "pipelines") == [], (
        "gateway/ must not import pipelines/: pipelines build on the gateway"
    )


def test_pure_transcription_modules_do_not_import_the_engine() -> None:
    pure = [ROOT / "pipelines" / "transcription" / name for name in PURE]
    assert offending(pure, ENGINE) == [], "the pure modules are sans I/O: import from .words"


def test_the_repository_imports_moved_modules_from_their_new_homes() -> None:
    paths = [
        path
        for package in ("gateway", "pipelines", "tests", "benchmarks")
        for path in modules(package)
    ]
    assert [hit for old in SHIMS for hit in offending(paths, old)] == [], (
        "import from the new home (gateway/ingest, gateway/speech), not the old name"
    )


def test_the_old_names_still_work() -> None:
    for old, new in SHIMS.items():
        shim, home = importlib.import_module(old), importlib.import_module(new)
        assert shim.__all__
        assert {name: getattr(shim, name) for name in shim.__all__} == {
            name: getattr(home, name) for name in shim.__all__
        }


def test_no_module_is_over_the_line_limit() -> None:
    lines = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for package in ("gateway", "pipelines")
        for path in modules(package)
    }
    assert {p: n for p, n in lines.items() if n > MAX_LINES} == {}, "split these modules"


def test_imports_are_found_in_functions_and_in_relative_form() -> None:
    nested = (
        "import os\n"
        "def f():\n"
        "    from pipelines.base import Gap\n"
        "class C:\n"
        "    def g(self):\n"
        "        import pipelines.speech as s\n"
    )
    found = {m for _, m in imports(nested, "gateway")}
    assert {m for m in found if within(m, "pipelines")} == {
        "pipelines.base",
        "pipelines.base.Gap",
        "pipelines.speech",
    }
    relative = "from .engine import ASR_RATE\nfrom . import engine\nfrom ..base import Gap\n"
    found = {m for _, m in imports(relative, "pipelines.transcription")}
    assert {m for m in found if within(m, ENGINE)} == {ENGINE, f"{ENGINE}.ASR_RATE"}
    assert "pipelines.base.Gap" in found
