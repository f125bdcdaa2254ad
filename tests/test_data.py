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


def write_splits(directory, splits):
    """A local dataset directory: one <split>.jsonl per split, as datasets infers splits on the hub."""
    directory.mkdir()
    for split, rows in splits.items():
        (directory / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(directory)


def rows(split, n, label=lambda i: i % 2):
    return [{"text": f"{split} sentence number {i} about {'cats' if i % 2 else 'dogs'}", "label": label(i)}
            for i in range(n)]


def test_probe_comes_from_validation_before_test(tmp_path):
    """GLUE-style: a test split with withheld labels (−1) next to a labelled validation split. The probe
    is the validation split; the test split's −1 would otherwise be a phantom third class."""
    path = write_splits(tmp_path / "glue", {"train": rows("train", 40), "validation": rows("validation", 20),
                                            "test": rows("test", 20, label=lambda i: -1)})
    for objective in ("cls", "clm"):
        task = load_task(path, objective, probe_size=16, min_probe_size=16, seed=0)
        assert len(task.probe_texts) == 16 and all(t.startswith("validation") for t in task.probe_texts)
        assert all(t.startswith("train") for t in task.train_texts)
    assert task.label_names is None
    assert load_task(path, "cls", probe_size=16, min_probe_size=16, seed=0).label_names == ["0", "1"]
    no_validation = write_splits(tmp_path / "plain", {"train": rows("train", 40), "test": rows("test", 20)})
    assert all(t.startswith("test") for t in load_task(no_validation, "cls", probe_size=16, min_probe_size=16,
                                                       seed=0).probe_texts)


@pytest.mark.parametrize("missing", [-1, None])
def test_unlabelled_probe_split_is_refused_for_classification(tmp_path, missing):
    path = write_splits(tmp_path / "d", {"train": rows("train", 40), "test": rows("test", 20, label=lambda i: missing)})
    with pytest.raises(DepthfastError, match="split 'test': 20 of 20 rows have no label"):
        load_task(path, "cls", probe_size=16, min_probe_size=16, seed=0)
    assert len(load_task(path, "clm", probe_size=16, min_probe_size=16, seed=0).probe_texts) == 16  # no labels needed


def test_unlabelled_rows_are_refused_in_a_pooled_hold_out(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows("train", 40, label=lambda i: -1 if i == 7 else i % 2)))
    with pytest.raises(DepthfastError, match="split 'train': 1 of 40 rows have no label"):
        load_task(str(path), "cls", probe_size=16, min_probe_size=16, seed=0)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dataset_config_selects_a_configuration(tmp_path):
    """A dataset with several configurations (hub style: README.md `configs:`) loads the one named by
    --dataset-config through datasets.load_dataset(name, config)."""
    for config, word in (("small", "alpha"), ("large", "omega")):
        for split, count in (("train", 40), ("validation", 20)):
            _write_jsonl(tmp_path / config / f"{split}.jsonl",
                         [{"text": f"{word} text number {i} of {split}", "label": i % 2} for i in range(count)])
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
                  f"  - split: validation\n    path: {c}/validation.jsonl\n" for c in ("small", "large"))
        + "---\n")
    task = load_task(str(tmp_path), "cls", probe_size=16, min_probe_size=16, seed=0, dataset_config="large")
    assert all(t.startswith("omega") for t in task.train_texts + task.probe_texts)
    assert all(t.endswith("of validation") for t in task.probe_texts)
    other = load_task(str(tmp_path), "cls", probe_size=16, min_probe_size=16, seed=0, dataset_config="small")
    assert all(t.startswith("alpha") for t in other.train_texts)


def test_dataset_config_on_a_single_file_or_builtin_is_one_line(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": f"text {i}", "label": i % 2} for i in range(40)])
    with pytest.raises(DepthfastError, match="single file"):
        load_task(str(path), "cls", probe_size=16, min_probe_size=16, seed=0, dataset_config="sst2")
    with pytest.raises(DepthfastError, match="has none"):
        load_task(BUILTIN, "cls", probe_size=16, min_probe_size=16, seed=0, dataset_config="sst2")
