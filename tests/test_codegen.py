"""learnmesh.codegen: the committed generated/ is fresh, typed, and clashes with no runtime name."""

from __future__ import annotations

from pathlib import Path

import pytest

from learnmesh import codegen


def make_tree(root: Path, files: list[str]) -> Path:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return root


def test_generated_areas_and_runtime_names(tmp_path: Path) -> None:
    generated = make_tree(
        tmp_path / "generated",
        ["learnmesh/auth/v1/auth_pb2.py", "learnmesh/events/v1/events_pb2.py"],
    )
    runtime = make_tree(
        tmp_path / "learnmesh",
        ["__init__.py", "config.py", "kernel/__init__.py", "__pycache__/config.cpython.pyc"],
    )
    assert codegen.generated_areas(generated) == {"auth", "events"}
    assert codegen.runtime_names(runtime) == {"__init__", "config", "kernel"}
    assert codegen.clashes(generated, runtime) == []


@pytest.mark.parametrize("taken", ["events.py", "auth/__init__.py", "auth/tokens.py"])
def test_a_runtime_module_named_like_a_generated_area_clashes(tmp_path: Path, taken: str) -> None:
    generated = make_tree(
        tmp_path / "generated",
        ["learnmesh/auth/v1/auth_pb2.py", "learnmesh/events/v1/events_pb2.py"],
    )
    runtime = make_tree(tmp_path / "learnmesh", ["__init__.py", "config.py", taken])
    name = taken.split("/")[0].removesuffix(".py")
    found = codegen.clashes(generated, runtime)
    assert len(found) == 1
    assert f"learnmesh/{name}" in found[0]
    assert f"generated area learnmesh.{name}" in found[0]


def test_the_check_fails_on_a_clash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = make_tree(tmp_path / "learnmesh", ["__init__.py", "events.py"])
    monkeypatch.setattr(codegen, "RUNTIME", runtime)
    assert codegen.main(["--check"]) == 1
    assert "name clash: learnmesh/events (the runtime)" in capsys.readouterr().err


def test_the_repository_is_fresh_and_has_no_clash(capsys: pytest.CaptureFixture[str]) -> None:
    assert codegen.clashes() == []
    assert codegen.main(["--check"]) == 0, capsys.readouterr().err


def test_generated_code_is_typed() -> None:
    """mypy-protobuf stubs beside every module, and PEP 561 markers in every package."""
    modules = sorted(codegen.GENERATED.rglob("*_pb2*.py"))
    assert modules
    for module in modules:
        assert module.with_suffix(".pyi").is_file(), module
        assert (module.parent / "py.typed").is_file(), module.parent
    grpc_stub = (codegen.GENERATED / "learnmesh/auth/v1/auth_pb2_grpc.pyi").read_text()
    assert "class AuthServiceStub" in grpc_stub
    assert "_aio.UnaryUnaryMultiCallable[" in grpc_stub
    for package in ("learnmesh", "interceptors", "services", "bridge"):
        assert (codegen.ROOT / package / "py.typed").is_file(), package
