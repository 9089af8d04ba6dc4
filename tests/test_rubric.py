import pytest

from conftest import ROOT
from selftune.errors import InputError
from selftune.rubric import load_rubric


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_rubric_validates():
    r = load_rubric(ROOT / "configs/rubrics/taste.yaml")
    kinds = {c.name: c.kind for c in r.criteria}
    assert kinds["grounded"] == "llm" and kinds["retrieval_hit"] == "check"


@pytest.mark.parametrize(
    "text, key",
    [
        ("criteria: []", "criteria"),
        ("criteria: [{kind: check, name: a, check: {type: word_bounds, min: 9, max: 2}}]", "criteria[0].check"),
        ("criteria: [{kind: check, name: a, check: {type: nope}}]", "criteria[0].check"),
        (
            "criteria: [{kind: llm, name: a, description: x, scale: {min: 1, max: 5, anchors: {1: a, 7: b}}}]",
            "criteria[0].scale",
        ),
        ("criteria: [{kind: llm, name: A b, description: x}]", "criteria[0].name"),
        ("criteria: [{kind: check, name: a, wieght: 2, check: {type: retrieval_hit}}]", "criteria[0].wieght"),
        ("criteria: [{kind: llm, name: a, description: x, group: Two words}]", "criteria[0].group"),
        ("criteria: [{kind: check, name: a, group: g, check: {type: retrieval_hit}}]", "criteria[0].group"),
    ],
)
def test_invalid_rubric_names_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_rubric(p)
    assert info.value.file == str(p)
    assert info.value.key.startswith(key)


def test_duplicate_names(tmp_path):
    p = write(
        tmp_path,
        "criteria: [{kind: check, name: a, check: {type: retrieval_hit}}, "
        "{kind: check, name: a, check: {type: retrieval_hit}}]",
    )
    with pytest.raises(InputError, match="repeat"):
        load_rubric(p)
