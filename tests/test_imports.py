"""The layers import one way: flows -> pipeline -> deepfusion_core (the CLI and the benchmarks
on top of all)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer may not import, at module level or inside a function alike.
FORBIDDEN = {
    "deepfusion_core": {"pipeline", "flows", "deepfusion_cli", "deepfusion_bench", "prefect"},
    "pipeline": {"flows", "deepfusion_cli", "deepfusion_bench", "prefect"},
    "flows": {"deepfusion_cli", "deepfusion_bench"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in a source file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(layer):
    files = sorted((ROOT / layer).glob("*.py"))
    assert files
    wrong = {f"{path.relative_to(ROOT)} imports {package}"
             for path in files for package in imported_packages(path) & FORBIDDEN[layer]}
    assert not wrong, sorted(wrong)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from prefect import flow\n    import flows.x\n")
    assert imported_packages(source) == {"prefect", "flows"}
