"""The three prompt-file formats, class-id files, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from fastvar.errors import MissingInputError, UsageError
from fastvar.eval.prompts import class_items, load_class_ids, load_prompts

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
]


def test_geneval_jsonl_keeps_each_line_as_metadata(tmp_path):
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL) + "\n")
    items = load_prompts(f)
    assert [i.prompt for i in items] == [m["prompt"] for m in GENEVAL]
    assert [i.metadata for i in items] == GENEVAL and [i.index for i in items] == [0, 1, 2]
    one = tmp_path / "one.txt"  # GenEval content under another name: read by content
    one.write_text(json.dumps(GENEVAL[0]) + "\n")
    assert load_prompts(one)[0].metadata == GENEVAL[0]


def test_mjhq_meta_data_json_and_plain_text(tmp_path):
    meta = {"abc": {"prompt": "a cat on a sofa", "category": "animals"}, "def": {"prompt": "a city", "category": "places"}}
    f = tmp_path / "meta_data.json"
    f.write_text(json.dumps(meta))
    items = load_prompts(f)
    assert [(i.prompt, i.category, i.metadata["id"]) for i in items] == [("a cat on a sofa", "animals", "abc"),
                                                                         ("a city", "places", "def")]
    t = tmp_path / "prompts.txt"
    t.write_text("a red fox\n\n  a lighthouse at dawn  \n")
    assert [(i.prompt, i.metadata) for i in load_prompts(t)] == [("a red fox", {"prompt": "a red fox"}),
                                                                 ("a lighthouse at dawn", {"prompt": "a lighthouse at dawn"})]


@pytest.mark.parametrize("content,match", [
    ("", "the file is empty"),
    ("\n  \n", "the file is empty"),
    ('{"tag": "single_object", "prompt": "x"}\n{"tag": broken\n', "line 2 is not valid JSON"),
    ('{"tag": "single_object", "include": [{"class": "cat"}], "prompt": "x"}\n', "lacks \"class\""),
    ('{"tag": "position", "include": [{"class": "a", "count": 1, "position": ["near", 0]}], "prompt": "x"}\n',
     "\"position\""),
    ('{"include": [], "prompt": "x"}\n', "no \"tag\""),
    ('{"tag": "colors", "include": [], "prompt": ""}\n', "no non-empty \"prompt\""),
])
def test_bad_prompt_files_fail_in_one_line(tmp_path, content, match):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(UsageError, match=match) as e:
        load_prompts(f)
    assert "\n" not in str(e.value) and "--prompts-file" in str(e.value)


def test_bad_mjhq_and_missing_files(tmp_path):
    f = tmp_path / "meta_data.json"
    f.write_text(json.dumps({"a": {"category": "x"}}))
    with pytest.raises(UsageError, match="entry 'a' has no non-empty"):
        load_prompts(f)
    f.write_text("[1, 2]")
    with pytest.raises(UsageError, match="not an object"):
        load_prompts(f)
    with pytest.raises(MissingInputError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError, match="not a UTF-8 text file"):
        load_prompts(tmp_path / "bin.txt")


def test_class_files(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("3\n# comment\n0  # first\n\n9\n")
    assert load_class_ids(f, 10) == [3, 0, 9]
    items = class_items([3, 5], procedural=True)
    assert items[0].metadata == {"class_id": 3, "tag": "colors", "prompt": "a photo of a red cross",
                                 "include": [{"class": "cross", "count": 1, "color": "red"}]}
    assert items[1].metadata["include"][0] == {"class": "circle", "count": 1, "color": "blue"}
    assert class_items([207])[0].metadata == {"class_id": 207, "prompt": "class 207"}
    for content, match in (("12\n", "out of range"), ("x\n", "not a whole number"), ("\n", "holds no class ids")):
        f.write_text(content)
        with pytest.raises(UsageError, match=match):
            load_class_ids(f, 10)
