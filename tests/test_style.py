"""Source checks of STYLE.md rules that a reader cannot see at a glance (no model, no imports)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "editkit"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MODEL_ARGUMENTS = {"lm", "lm_or_engine"}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_model_arguments_are_typed():
    """A model argument says what it is (``LoadedModel``), not ``Any`` or nothing."""
    loose = []
    for path in SOURCES:
        for function in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            arguments = function.args
            for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                if argument.arg not in MODEL_ARGUMENTS:
                    continue
                annotation = ast.unparse(argument.annotation) if argument.annotation is not None else "nothing"
                if annotation in ("Any", "nothing", "object"):
                    loose.append(f"{path.relative_to(PACKAGE.parent)}:{function.lineno} {function.name}"
                                 f"({argument.arg}: {annotation})")
    assert not loose, "model arguments typed loosely:\n" + "\n".join(loose)


def test_no_print_and_no_literal_cuda():
    """Logging, not print; the device comes from the model, never a literal "cuda"."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.name}:{node.lineno} print()")
            if isinstance(node, ast.Constant) and node.value == "cuda":
                found.append(f"{path.name}:{node.lineno} 'cuda'")
    assert not found, found
