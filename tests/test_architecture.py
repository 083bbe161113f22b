"""The package's shape: imports run one way through the layers, and no module grows past its concern.

Each module of `cse_ray` belongs to one layer; it may import its own layer and the ones below, never
one above (a function-level import counts too). docs/ARCHITECTURE.md shows the same map.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cse_ray"

LAYERS: list[tuple[str, ...]] = [
    # foundations: no torch, no Ray, no config
    ("errors", "labels", "artifacts", "layout", "formats", "metrics"),
    ("config", "runtime"),
    ("models",),  # networks know nothing of datasets
    ("data",),
    # the method: losses, optimiser, CAMs, CRF, pictures
    ("objective", "optim", "cam", "crf", "plots", "rw", "affinity_loss", "segment"),
    ("evaluate",),
    # stages on Ray
    ("train", "infer"),
    ("tune", "report"),
    ("pipeline",),
    ("cli",),
]
MAX_LINES = 420


def _layer_of(module: str) -> int:
    """Layer of a dotted module name below cse_ray (`train.loop` belongs to `train`)."""
    top = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"cse_ray.{module} is in no layer of tests/test_architecture.py: add it")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            modules[".".join(parts)] = path
    return modules


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, cse_ray module) for every import of the package in the file, at any depth."""
    found = []
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name[len("cse_ray."):]) for a in node.names
                      if a.name.startswith("cse_ray.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "cse_ray" or node.module.startswith("cse_ray.")):
                target = node.module[len("cse_ray."):] if node.module != "cse_ray" else ""
            else:
                continue
            if target:
                found.append((node.lineno, target))
            else:  # `from cse_ray import artifacts` (names that are not modules, e.g. __version__, skipped)
                found += [(node.lineno, a.name) for a in node.names
                          if (PACKAGE / f"{a.name}.py").is_file() or (PACKAGE / a.name).is_dir()]
    return found


def test_every_module_has_a_layer():
    for module in _modules():
        _layer_of(module)


def test_imports_never_go_up_a_layer():
    upward = []
    for module, path in _modules().items():
        own = _layer_of(module)
        for line, target in _imports(path, module):
            if _layer_of(target) > own:
                upward.append(f"cse_ray/{path.relative_to(PACKAGE)}:{line} ({module}, layer {own}) imports "
                              f"{target} (layer {_layer_of(target)})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a data module importing the training stage is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cse_ray.train import fit_stage\n")
    (line, target), = _imports(bad, "data.bad")
    assert (line, target) == (2, "train")
    assert _layer_of(target) > _layer_of("data.bad")


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_stay_small(module):
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"cse_ray.{module} has {lines} lines: split it by concern"
