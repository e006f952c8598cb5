"""examples/make_models.py: it rewrites the shipped demo repository, and only its own files."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from fleetserve.loaders import testing

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
spec = importlib.util.spec_from_file_location("make_models", EXAMPLES / "make_models.py")
assert spec is not None and spec.loader is not None
make_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_models)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_the_shipped_models_are_what_the_generator_writes(tmp_path: Path) -> None:
    files = make_models.generate(tmp_path)
    assert all(changed for _, changed in files)
    assert tree(tmp_path) == tree(EXAMPLES / "models")


def test_it_writes_only_its_own_files_and_deletes_nothing(tmp_path: Path) -> None:
    """A served copy gains uploaded versions and configs: regenerating keeps them all."""
    repo = tmp_path / "models"
    shutil.copytree(EXAMPLES / "models", repo)
    testing.write_model(repo, "mlp", testing.mlp(seed=4), version=4, config="max_batch_size: 8\n")
    (repo / "mlp" / ".upload-5-1a2b3c").mkdir()  # an upload being staged
    (repo / "simple" / "1" / "notes.txt").write_text("mine")
    (repo / "identity_fp32" / "1" / "model.onnx").write_bytes(b"damaged")
    ours = {"identity_fp32/1/model.onnx": tree(EXAMPLES / "models")["identity_fp32/1/model.onnx"]}
    before = tree(repo)

    assert make_models.main(["--out", str(repo)]) == 0

    assert tree(repo) == {**before, **ours}  # only the damaged file of ours was rewritten
    assert (repo / "mlp" / ".upload-5-1a2b3c").is_dir()
    files = dict(make_models.generate(repo))
    assert not any(files.values())  # all in place now: nothing rewritten
    assert set(map(str, files)) == {str(repo / name) for name in tree(EXAMPLES / "models")}


def test_without_onnx_it_says_how_to_get_it_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails as if absent
    assert make_models.main(["--out", str(tmp_path)]) == 1
    assert "pip install onnx" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
