"""The built-in task, local dataset files, and the held-out probe set."""

import json

import pytest

from depthfast.data import BUILTIN, load_task
from depthfast.errors import DepthfastError


def test_builtin_probe_is_held_out_and_stratified():
    task = load_task(BUILTIN, "cls", probe_size=96, min_probe_size=16, seed=0)
    assert task.num_labels == 8
    assert not set(task.probe_texts) & set(task.train_texts)
    assert len(task.probe_texts) == 96 and len(task.train_texts) > 500
    assert set(task.probe_labels) == set(range(8))  # every topic is probed
    again = load_task(BUILTIN, "cls", probe_size=96, min_probe_size=16, seed=0)
    assert again.probe_texts == task.probe_texts and again.train_labels == task.train_labels
    other = load_task(BUILTIN, "cls", probe_size=96, min_probe_size=16, seed=1)
    assert other.probe_texts != task.probe_texts


def test_language_modelling_needs_no_labels():
    task = load_task(BUILTIN, "clm", probe_size=32, min_probe_size=16, seed=0)
    assert task.train_labels is None and task.label_names is None and len(task.probe_texts) == 32


def test_jsonl_with_test_split_and_string_labels(tmp_path):
    rows = [{"text": f"sentence {i} about {'cats' if i % 2 else 'dogs'}", "kind": "cat" if i % 2 else "dog"}
            for i in range(60)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path), "cls", probe_size=20, min_probe_size=16, seed=0, label_column="kind")
    assert task.label_names == ["cat", "dog"]
    assert len(task.probe_texts) == 20 and len(task.train_texts) == 40
    for text, label in zip(task.probe_texts, task.probe_labels):
        assert task.label_names[label] == ("cat" if "cats" in text else "dog")


def test_missing_column_names_the_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(40)))
    with pytest.raises(DepthfastError, match="no column 'text'"):
        load_task(str(path), "clm", probe_size=16, min_probe_size=16, seed=0)


def test_one_label_is_not_a_classification_task(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text {i}", "label": 1}) for i in range(80)))
    with pytest.raises(DepthfastError, match="at least 2 distinct labels"):
        load_task(str(path), "cls", probe_size=16, min_probe_size=16, seed=0)


def test_unknown_file_format(tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<a/>")
    with pytest.raises(DepthfastError, match="unknown format"):
        load_task(str(path), "clm", probe_size=16, min_probe_size=16, seed=0)
