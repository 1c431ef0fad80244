"""The package's layers, read from the source: a lower layer never imports a higher one.

    core      the patch-parallel algorithm (layout, math, exchange, layers, loop, rank group)
    engines   UNet segments, export, runners, build cache           -> core
    embedded  the project's own default model                       -> core
    client    request tensors and Triton clients (no torch)         -> core.defaults only
    demo      the browser page and its proxy (no torch)             -> client, core.defaults
    serving   Triton models, rank service, repository, launcher     -> core, engines, client, demo (its command)
    cli       the command line                                      -> everything
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python_backend"

ALLOWED = {
    "core": {"core"},
    "engines": {"core", "engines"},
    "embedded": {"core", "embedded"},
    "client": {"client", "core.defaults"},
    "demo": {"client", "core.defaults", "demo"},
    "serving": {"core", "engines", "client", "demo", "serving"},
    "cli": {"core", "engines", "client", "demo", "serving", "embedded", "cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every python_backend module that ``path`` imports, anywhere in the file (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("python_backend.")}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def allowed(importer_layer: str, imported: str) -> bool:
    target = imported.split(".", 1)[1]  # without "python_backend."
    return any(target == rule or target.startswith(rule + ".") for rule in ALLOWED[importer_layer])


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "model_repository" not in p.parts)


def test_every_module_belongs_to_a_known_layer():
    strays = [str(p.relative_to(PACKAGE)) for p in _sources()
              if p.parent != PACKAGE and layer_of(_module_name(p)) not in ALLOWED]
    assert not strays, f"modules outside the layers {sorted(ALLOWED)}: {strays}"
    top_level = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top_level == ["__init__.py"], f"modules directly in python_backend/: {top_level}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    layer = layer_of(_module_name(path))
    if layer is None:  # python_backend/__init__.py
        assert project_imports(path) == set()
        return
    wrong = sorted(m for m in project_imports(path) if layer_of(m) in ALLOWED and not allowed(layer, m))
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])}; {path.name} imports {wrong}"


def test_the_client_library_needs_no_torch():
    for path in (PACKAGE / "client").rglob("*.py"):
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert "torch" not in imported and "diffusers" not in imported, path.name


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule above could pass vacuously; show it flags a core module importing serving."""
    fake = PACKAGE / "core" / "layout.py"
    source = tmp_path / "python_backend" / "core" / "layout.py"
    source.parent.mkdir(parents=True)
    source.write_text(fake.read_text() + "\nfrom ..serving import settings\n")
    imports = project_imports_at(source, tmp_path / "python_backend")
    assert "python_backend.serving.settings" in imports
    assert not allowed("core", "python_backend.serving.settings")


def project_imports_at(path: Path, package_root: Path) -> set[str]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, package_root
    try:
        return project_imports(path)
    finally:
        PACKAGE = saved


def test_every_transport_implements_the_interface_the_layers_use():
    from python_backend.core.exchange import BufferExchange
    from python_backend.core.transport import BufferTransport
    from python_backend.engines.segments import SegmentIO, ShapeRecorder

    for transport in (BufferExchange(None, 0, 1), SegmentIO({}), ShapeRecorder()):
        assert isinstance(transport, BufferTransport), type(transport).__name__
    assert not isinstance(object(), BufferTransport)
