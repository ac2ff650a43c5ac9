"""docs/config.md is generated from the config dataclasses, and every field in it has a doc."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embshard.cluster.cli import main
from embshard.config import JobConfig
from embshard.config_reference import COMMAND, build_reference, field_docs
from embshard.errors import ConfigError
from embshard.typed_config import from_dict, parse_yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "config.md"


@dataclass
class _Inner:
    """An inner section.

    told:  documented in the docstring,
           over two lines.
    """

    told: int = 1
    # Above the field: the reason
    # over two lines.
    above: str = "x"
    trailing: float | None = None  # after the field
    bare: bool = False


@dataclass
class _Root:
    inner: _Inner = field(default_factory=lambda: _Inner(told=7))  # the inner section
    maybe: _Inner | None = None
    top: list[int] = field(default_factory=lambda: [1, 2])  # a top-level list


def test_docs_come_from_trailing_and_leading_comments_and_the_docstring() -> None:
    assert field_docs(_Inner) == {
        "told": "documented in the docstring, over two lines.",
        "above": "Above the field: the reason over two lines.",
        "trailing": "after the field",
    }


def test_walk_lists_sections_with_effective_defaults_and_every_undocumented_field() -> None:
    ref = build_reference(_Root)
    assert [s.key for s in ref.sections] == ["", "inner", "maybe"]
    inner = {e.key: e for e in ref.sections[1].entries}
    assert inner["inner.told"].default == "7"  # the root builds its section unlike _Inner()
    assert {e.key: e.default for e in ref.sections[2].entries}["maybe.told"] == "1"
    assert (inner["inner.trailing"].type, inner["inner.trailing"].default) == ("float | null", "null")
    assert ref.sections[1].doc == "the inner section. An inner section."
    # `maybe` has no comment of its own but _Inner's docstring describes it.
    assert ref.undocumented == ["inner.bare", "maybe.bare"]
    assert "| `inner.trailing` | `float \\| null` | `null` | after the field |" in ref.markdown()


def test_every_config_field_is_documented() -> None:
    missing = build_reference(JobConfig).undocumented
    assert not missing, "config fields without a doc comment: " + ", ".join(missing)


def test_docs_config_md_is_current(capsys) -> None:
    assert main(["config", "--reference"]) == 0
    generated = capsys.readouterr().out
    assert generated == build_reference(JobConfig).markdown()
    assert DOCS.is_file() and DOCS.read_text() == generated, f"docs/config.md is stale: run `{COMMAND}`"


@pytest.mark.slow  # a fresh interpreter: this process has imported torch long ago
def test_help_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys\nfrom embshard.cluster.cli import main\n"
        "for verb in ([], ['config'], ['plan']):\n"
        "    try:\n        main([*verb, '--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchrec', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@dataclass
class _Derived(_Inner):
    bare: bool = True  # redeclared with a doc


def test_inherited_fields_keep_the_docs_of_the_class_that_declares_them() -> None:
    docs = field_docs(_Derived)
    assert docs["trailing"] == "after the field" and docs["bare"] == "redeclared with a doc"


def test_the_json_schema_refuses_what_the_loader_refuses(capsys) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert main(["config", "--json-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    for config in ("configs/default.yaml", "configs/papers/mde-mf-movielens.yaml", "configs/two-tower-movielens.yaml"):
        jsonschema.validate(parse_yaml((REPO / config).read_text()), schema)
    for bad, where in ((({"train": {"batch_size": 8}}), "train"), ({"embeddings": {"policy": "autodim"}}, "policy"),
                       ({"cluster": {"worker_resources": {"x": "one"}}}, "worker_resources"),
                       ({"model": {"dense_arch": [64.5]}}, "dense_arch")):
        with pytest.raises(jsonschema.ValidationError) as e:
            jsonschema.validate(bad, schema)
        assert where in "/".join(map(str, e.value.absolute_path)) or where in e.value.message
        with pytest.raises(ConfigError):
            from_dict(JobConfig, bad)



def test_model_arch_doc_names_every_built_in() -> None:
    from embshard.trainer.models import _BUILTIN

    doc = next(e.doc for s in build_reference(JobConfig).sections for e in s.entries if e.key == "model.arch")
    named = doc.split("(", 1)[1].split(")", 1)[0]
    assert named.split(", ") == list(_BUILTIN)  # fm was left out
