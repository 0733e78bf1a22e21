"""The notebook contract (STYLE.md principles 1, 10 and 16), checked without running a kernel.

* Source notebooks are committed without outputs or execution counts, with a ``python3``
  kernelspec, and define no functions or classes (a one-line lambda is fine).
* Each has exactly one cell tagged ``parameters`` holding only literal assignments.
* papermill only *warns* on a parameter the notebook does not declare, so every
  ``parameters/<notebook>/*.yaml`` may only use the names of that cell, and merged over the
  cell's defaults must build a valid params object.
* The cell right after the parameters cell validates them and must use every parameter,
  so no papermill value is silently dropped: by name, or through the params class's
  ``from_parameters(globals())``, which reads every field the namespace defines.

Running the notebooks end to end is nbval's job (``pytest --nbval-lax notebooks/``).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PARAMETERS = ROOT / "parameters"

# The params class each notebook's validation cell builds ("module:Class").
PARAMS_CLASSES = {
    "00_quickstart": "editkit.runs:StudyConfig",
    "01_number_of_edits": "editkit.runs:StudyConfig",
    "02_instruct_vs_base": "editkit.runs:StudyConfig",
    "03_model_scale": "editkit.runs:StudyConfig",
    "04_capabilities": "editkit.runs:StudyConfig",
    "05_safety": "editkit.runs:StudyConfig",
}
# Parameters a notebook may declare besides its params class's fields: settings used before
# the params object exists (the quickstart's pip source on Colab). Not being fields, they
# must be used by name in the validation cell.
NOTEBOOK_ONLY_PARAMETERS = {
    "00_quickstart": ("editkit_source",),
    "02_instruct_vs_base": ("pairs",),
}
# Parameter files every notebook with a parameters folder must provide; the quickstart is
# a tour (a CPU smoke run and a Colab GPU run), not a study with a demo and a paper setting.
REQUIRED_FILES = {
    "00_quickstart": ("smoke.yaml", "colab.yaml"),
}
DEFAULT_REQUIRED_FILES = ("smoke.yaml", "demo.yaml", "paper.yaml")


def _read(path: Path) -> Any:
    return nbformat.read(path, as_version=4)


def _code_cells(notebook: Any) -> list[Any]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _python_source(source: str) -> str:
    # IPython magics and shell escapes are not Python; blank them so `ast` can parse the rest.
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _parameters_cells(notebook: Any) -> list[Any]:
    return [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]


def _parameters_cell(notebook: Any) -> Any:
    (cell,) = _parameters_cells(notebook)
    return cell


def _literal_assignments(source: str) -> dict[str, Any]:
    """``{name: value}`` of a cell that may only hold ``name = <literal>`` statements."""
    values: dict[str, Any] = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign), f"line {node.lineno}: only assignments belong in a parameters cell"
        assert len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"line {node.lineno}: assign one plain name per statement"
        )
        name = node.targets[0].id
        try:
            values[name] = ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(f"parameter {name!r} (line {node.lineno}) is not a literal: {ast.unparse(node.value)}")
    return values


def _defaults(notebook_path: Path) -> dict[str, Any]:
    return _literal_assignments(_parameters_cell(_read(notebook_path)).source)


def _params_values(notebook_path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the notebook-only parameters: what the params class receives."""
    own = set(NOTEBOOK_ONLY_PARAMETERS.get(notebook_path.stem, ()))
    return {name: value for name, value in values.items() if name not in own}


def _parameter_files() -> list[tuple[Path, Path]]:
    pairs = []
    for notebook in NOTEBOOKS:
        folder = PARAMETERS / notebook.stem
        pairs += [(notebook, path) for path in sorted(folder.glob("*.yaml"))]
    return pairs


def _params_class(notebook_path: Path) -> type:
    target = PARAMS_CLASSES.get(notebook_path.stem)
    if target is None:
        pytest.fail(f"add {notebook_path.stem!r} to PARAMS_CLASSES in {Path(__file__).name}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        pytest.skip(f"{module_name} is not importable yet ({error}); cannot build {class_name}")
    return getattr(module, class_name)


def _id(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(part.relative_to(ROOT).as_posix() for part in value)
    return value.relative_to(ROOT).as_posix()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks under notebooks/"


@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=_id)
def test_notebook_is_clean(notebook_path):
    notebook = _read(notebook_path)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    for index, cell in enumerate(_code_cells(notebook)):
        where = f"{notebook_path.name} code cell {index}"
        assert not cell.get("outputs"), f"{where} has outputs: clear them before committing"
        assert cell.get("execution_count") is None, f"{where} has an execution count"
        for node in ast.walk(ast.parse(_python_source(cell.source))):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
                f"{where} defines {node.name!r}: move it into editkit/"
            )


@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=_id)
def test_one_literal_parameters_cell(notebook_path):
    notebook = _read(notebook_path)
    tagged = _parameters_cells(notebook)
    assert len(tagged) == 1, f"{notebook_path.name}: {len(tagged)} cells tagged 'parameters', expected 1"
    (cell,) = tagged
    assert cell.cell_type == "code"
    defaults = _literal_assignments(cell.source)
    assert defaults, "the parameters cell assigns nothing"
    names = [node.targets[0].id for node in ast.parse(cell.source).body]
    assert len(names) == len(set(names)), f"a parameter is assigned twice: {names}"


@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=_id)
def test_papermill_sees_every_parameter(notebook_path):
    # papermill parses the cell line by line with a regex, not with `ast`: a line it cannot
    # read (an "=" inside a trailing comment, a value spread over lines) is left out, and a
    # value passed for it is then reported as an "unknown parameter" and ignored.
    papermill = pytest.importorskip("papermill")
    seen = set(papermill.inspect_notebook(str(notebook_path)))
    missing = sorted(set(_defaults(notebook_path)) - seen)
    assert not missing, f"papermill cannot parse the lines of parameters {missing}"


@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=_id)
def test_validation_cell_uses_every_parameter(notebook_path):
    notebook = _read(notebook_path)
    cells = _code_cells(notebook)
    position = cells.index(_parameters_cell(notebook))
    assert position + 1 < len(cells), "no validation cell after the parameters cell"
    validation = ast.parse(_python_source(cells[position + 1].source))
    used = {node.id for node in ast.walk(validation) if isinstance(node, ast.Name)}
    reads_namespace = any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_parameters"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == _params_class(notebook_path).__name__
        and any(isinstance(a, ast.Call) and getattr(a.func, "id", None) == "globals" for a in node.args)
        for node in ast.walk(validation)
    )
    if reads_namespace:  # every parameter that is a field is read; test_parameters_match_params_class checks the rest
        used |= set(_params_class(notebook_path).field_names())
    unused = sorted(set(_defaults(notebook_path)) - used)
    assert not unused, f"the validation cell ignores parameters {unused}"


@pytest.mark.parametrize("notebook_path", NOTEBOOKS, ids=_id)
def test_parameters_match_params_class(notebook_path):
    params_class = _params_class(notebook_path)
    defaults = _defaults(notebook_path)
    own = set(NOTEBOOK_ONLY_PARAMETERS.get(notebook_path.stem, ()))
    assert own <= set(defaults), f"NOTEBOOK_ONLY_PARAMETERS names {sorted(own - set(defaults))}, not parameters"
    # Legacy one-value spellings (``model`` beside ``models``) need not be notebook parameters.
    fields = set(params_class.field_names())
    assert not own & fields, f"{sorted(own & fields)} are {params_class.__name__} fields, not notebook-only"
    legacy = set(getattr(params_class, "LEGACY_FIELDS", ()))
    assert set(defaults) - fields - own == set() and fields - set(defaults) - legacy == set(), (
        f"parameters cell vs {params_class.__name__}: missing {sorted(fields - set(defaults))}, "
        f"extra {sorted(set(defaults) - fields - own)}"
    )
    params_class.from_dict(_params_values(notebook_path, defaults), where=f"{notebook_path.name} parameters cell")


@pytest.mark.parametrize("notebook_path", [p for p in NOTEBOOKS if (PARAMETERS / p.stem).is_dir()], ids=_id)
def test_parameter_files_exist(notebook_path):
    folder = PARAMETERS / notebook_path.stem
    required = REQUIRED_FILES.get(notebook_path.stem, DEFAULT_REQUIRED_FILES)
    missing = [name for name in required if not (folder / name).is_file()]
    assert not missing, f"{folder.relative_to(ROOT)} lacks {missing}"


@pytest.mark.parametrize(("notebook_path", "yaml_path"), _parameter_files(), ids=_id)
def test_parameter_file_keys_are_declared(notebook_path, yaml_path):
    values = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
    assert isinstance(values, dict), f"{yaml_path.name}: expected a mapping"
    unknown = sorted(set(values) - set(_defaults(notebook_path)))
    assert not unknown, (
        f"{yaml_path.relative_to(ROOT)} sets {unknown}, which the notebook's parameters cell does not "
        "declare (papermill would only warn and ignore them)"
    )


@pytest.mark.parametrize(("notebook_path", "yaml_path"), _parameter_files(), ids=_id)
def test_parameter_file_builds_params(notebook_path, yaml_path):
    params_class = _params_class(notebook_path)
    values = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
    params_class.from_dict(_params_values(notebook_path, {**_defaults(notebook_path), **values}),
                           where=str(yaml_path.relative_to(ROOT)))


@pytest.mark.parametrize(("notebook_path", "yaml_path"),
                         [(n, y) for n, y in _parameter_files() if "pairs" in _defaults(n)], ids=_id)
def test_instruct_pairs_name_models_of_the_study(notebook_path, yaml_path):
    from editkit.findings import check_pairs

    values = {**_defaults(notebook_path), **(yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {})}
    check_pairs(values["pairs"], values["models"])
