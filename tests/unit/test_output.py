"""Output paths: a folder, or a file where a parent folder should be, is refused with a sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditor._output import check_output_file, check_output_folder, output_file, write_text
from auditor.cli import main
from auditor.errors import ConfigError


@pytest.fixture
def places(tmp_path: Path) -> Path:
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("folder", "cannot write {root}/folder: it is a directory; give a file path"),
        ("afile/lib.yaml", "cannot write {root}/afile/lib.yaml: {root}/afile is a file, not a folder"),
        ("afile/deeper/lib.yaml", "cannot write {root}/afile/deeper/lib.yaml: {root}/afile is a file, not a folder"),
    ],
)
def test_a_path_that_cannot_be_a_file_is_refused(places: Path, rel: str, message: str) -> None:
    for check in (check_output_file, output_file, lambda p: write_text(p, "text")):
        with pytest.raises(ConfigError) as info:
            check(places / rel)
        assert info.value.message == message.format(root=places)


def test_the_check_makes_nothing_and_writing_makes_the_parents(tmp_path: Path) -> None:
    target = tmp_path / "new" / "sub" / "out.yaml"
    assert check_output_file(target) == target and not (tmp_path / "new").exists()
    assert write_text(target, "a: 1\n") == target and target.read_text() == "a: 1\n"
    assert write_text(target, "a: 2\n") == target and target.read_text() == "a: 2\n"  # overwritten


def test_an_output_folder_must_not_be_a_file(places: Path) -> None:
    assert check_output_folder(places / "folder") == places / "folder"
    assert check_output_folder(places / "new" / "run") == places / "new" / "run" and not (places / "new").exists()
    with pytest.raises(ConfigError, match="it is a file, not a folder; give a folder path"):
        check_output_folder(places / "afile")
    with pytest.raises(ConfigError, match="afile is a file, not a folder"):
        check_output_folder(places / "afile" / "run")


def _import(export: Path, out: Path) -> int:
    argv = ["library", "import-neuronpedia", str(export), "--sae-id", "s", "--model", "m"]
    return main([*argv, "--hookpoint", "blocks.1.hook_resid_post", "-o", str(out)])


@pytest.mark.parametrize(
    ("rel", "needle"), [("folder", "it is a directory; give a file path"), ("afile/lib.yaml", "afile is a file, not a folder")]
)
def test_commands_that_write_a_file_say_why_they_cannot(
    places: Path, rel: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    export = places / "export.jsonl"
    export.write_text(json.dumps({"modelId": "m", "layer": "l", "index": 1, "description": "fraud"}) + "\n")
    data = places / "data"
    data.mkdir()
    rows = [{"id": f"{c}-{i}", "category": c, "kind": "prompt", "text": f"text {i}"} for c in ("benign", "bias") for i in range(4)]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = places / rel
    runs = {
        "import-neuronpedia": lambda: _import(export, out),
        "split-data": lambda: main(["split-data", str(data), "-o", str(out)]),
        "evaluate-detection": lambda: main(["evaluate-detection", "--data", str(data), "--json", str(out)]),
        "discover": lambda: main(["discover", "--data", str(data), "--markdown", str(out)]),
        "index-features": lambda: main(["index-features", "--corpus", "c.jsonl", "--sae", "s", "--out", str(out)]),
        "train-sae": lambda: main(["train-sae", "--hookpoint", "blocks.1.hook_resid_post", "--corpus", "c.jsonl",
                                   "--out", str(places / "run"), "--save-activations", str(out)]),  # fmt: skip
    }
    for name, run in runs.items():
        assert run() == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write {out}: ") and needle in err, (name, err)
    assert not (places / "run").exists()
