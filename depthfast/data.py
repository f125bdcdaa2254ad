"""Fine-tuning data and the held-out probe set.

The built-in task needs no download: Python's own documentation (``pydoc_data.topics``, shipped
with CPython) cut into paragraphs, labelled by topic. Any other data goes through
``datasets.load_dataset``: a hub name, a local .txt / .json / .jsonl / .csv / .parquet file, or a
local directory of such files (splits by file name, as on the hub: train.jsonl, validation.jsonl …).

The probe set — the inputs on which the pretrained and the fine-tuned model are compared — is held
out: no probe text is ever trained on (texts that also occur in the training split are dropped
from the probe). It comes from the dataset's ``validation`` split, else its ``test`` split (test
labels are often withheld: GLUE marks them −1), else a seeded hold-out of all the data. For
classification, a row of a split in use whose label is missing (None) or −1 is refused.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass

from depthfast.errors import DepthfastError
from depthfast.hub import go_offline_if_unreachable, hub_reachable

BUILTIN = "builtin:pydoc"
MIN_PARAGRAPH_CHARS = 80
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PROBE_SPLITS = ("validation", "test")  # in order of preference
UNLABELLED = (None, -1)  # how datasets mark a withheld label (GLUE's test splits: −1)


@dataclass
class Task:
    """Texts (and labels for classification) split into a training set and a held-out probe set."""

    source: str
    train_texts: list[str]
    probe_texts: list[str]
    train_labels: list[int] | None = None
    probe_labels: list[int] | None = None
    label_names: list[str] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])


def pydoc_paragraphs(num_topics: int) -> tuple[list[str], list[str]]:
    """(paragraphs, topic of each) from the ``num_topics`` topics with the most paragraphs of their own."""
    from pydoc_data.topics import topics

    per_topic = {
        name: [p.strip() for p in text.split("\n\n") if len(p.strip()) >= MIN_PARAGRAPH_CHARS]
        for name, text in topics.items()
    }
    # Some topics repeat others' paragraphs (attribute-access lies inside specialnames): a paragraph
    # under two topics has no single label, so it is left out.
    topics_of = Counter(p for name in per_topic for p in set(per_topic[name]))
    per_topic = {name: list(dict.fromkeys(p for p in ps if topics_of[p] == 1)) for name, ps in per_topic.items()}
    chosen = sorted(per_topic, key=lambda name: (-len(per_topic[name]), name))[:num_topics]
    texts, labels = [], []
    for name in chosen:
        texts += per_topic[name]
        labels += [name] * len(per_topic[name])
    return texts, labels


def _load_records(dataset: str, text_column: str, label_column: str | None,
                  config_name: str = "") -> tuple[dict[str, list], str]:
    """Rows of a local file or hub dataset (``config_name``: its configuration) as {split: [(text, label or None)]}."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard requirement
        raise DepthfastError("the 'datasets' package is needed to load --dataset") from exc

    ext = os.path.splitext(dataset)[1].lower()
    named = (dataset, config_name) if config_name else (dataset,)
    if config_name and not os.path.isdir(dataset) and (os.path.exists(dataset) or ext in LOCAL_BUILDERS):
        raise DepthfastError(f"--dataset-config {config_name!r} names a configuration of a hub dataset or a "
                             f"dataset directory; {dataset!r} is a single file")
    local, files = os.path.exists(dataset), []
    if os.path.isdir(dataset):  # a local directory of data files (or a hub-style repository with configs)
        args, kwargs = named, {}
        files = [os.path.join(dataset, n) for n in sorted(os.listdir(dataset))
                 if os.path.splitext(n)[1].lower() in LOCAL_BUILDERS]
    elif local:
        if ext not in LOCAL_BUILDERS:
            raise DepthfastError(f"dataset file {dataset!r}: unknown format; use one of {sorted(LOCAL_BUILDERS)}")
        files = [dataset]
        args, kwargs = (LOCAL_BUILDERS[ext],), {"data_files": dataset}
    elif ext in LOCAL_BUILDERS or dataset.startswith((".", "/", "~")):
        raise DepthfastError(f"dataset file {dataset!r} does not exist")
    else:
        args, kwargs = named, {}
        go_offline_if_unreachable()
    for path in files:
        if os.path.getsize(path) == 0:
            raise DepthfastError(f"dataset file {path!r} is empty")
    import logging

    library_log = logging.getLogger("datasets")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)  # its parsers log the error too: the one line below says it
    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types: missing, offline, bad format
        for path in files:  # a JSON-lines file names its bad line itself
            check_data_file(path)
        reason = root_cause(exc)
        if not local and not hub_reachable():  # only a hub id can be missing for want of the hub
            reason += " (the hub is unreachable: only locally cached datasets load)"
        shown = f"{dataset}:{config_name}" if config_name else dataset
        raise DepthfastError(f"cannot load dataset {shown!r}: {reason}") from None
    finally:
        library_log.setLevel(level)
    splits = {}
    for split_name, split in loaded.items():
        missing = [c for c in (text_column, label_column) if c and c not in split.column_names]
        if missing:
            raise DepthfastError(
                f"dataset {dataset!r} split {split_name!r} has no column {missing[0]!r}; columns: {split.column_names}"
            )
        labels = split[label_column] if label_column else [None] * len(split)
        splits[split_name] = list(zip(split[text_column], labels))
    return splits, dataset


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost error with a message in ``exc``'s chain: datasets wraps a parser's
    error ("JSON parse error … in row 49") in a generic "An error occurred while generating the dataset"."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    generic = ("An error occurred while generating the dataset",)
    for item in chain[1:] + chain[:1]:  # inner causes first, the outer message last
        text = str(item).strip()
        if text and not text.startswith(generic):
            return f"{type(item).__name__}: {text.splitlines()[0]}"
    return type(chain[0]).__name__


def check_data_file(path: str) -> None:
    """A local data file's own errors, with the file and row: empty, or (JSON lines) a line that does not
    parse: the real cause instead of datasets' generic message (read only after datasets failed)."""
    import json

    if os.path.getsize(path) == 0:
        raise DepthfastError(f"dataset file {path!r} is empty")
    if path.lower().endswith(".jsonl"):
        rows = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    json.loads(line)
                except ValueError as exc:
                    raise DepthfastError(f"dataset file {path!r} line {number}: not valid JSON ({exc})") from None
        if not rows:
            raise DepthfastError(f"dataset file {path!r} has no rows (only blank lines)")


def load_task(
    dataset: str,
    objective: str,
    *,
    probe_size: int,
    min_probe_size: int,
    seed: int,
    text_column: str = "text",
    label_column: str = "label",
    num_topics: int = 8,
    dataset_config: str = "",
) -> Task:
    """Load texts for ``objective`` ("cls" needs labels) and hold out ``probe_size`` probe texts.

    A dataset with a "validation" (else a "test") split and a "train" split takes the probe from
    it; otherwise the probe is a seeded random hold-out (stratified by label for classification).
    """
    needs_labels = objective == "cls"
    if dataset == BUILTIN:
        if dataset_config:
            raise DepthfastError(f"--dataset-config {dataset_config!r} names a configuration of a hub dataset; "
                                 f"{BUILTIN} has none")
        texts, raw_labels = pydoc_paragraphs(num_topics)
        splits = {"train": list(zip(texts, raw_labels))}
    else:
        splits, _ = _load_records(dataset, text_column, label_column if needs_labels else None, dataset_config)
    rows_train = [r for r in splits.get("train", []) if isinstance(r[0], str) and r[0].strip()]
    probe_split = next((s for s in PROBE_SPLITS if s in splits), None)
    rng = random.Random(seed)
    if probe_split is not None and rows_train:
        if needs_labels:
            _check_labelled(dataset, splits, ["train", probe_split], label_column)
        rows_probe = [r for r in splits[probe_split] if isinstance(r[0], str) and r[0].strip()]
        rng.shuffle(rows_probe)
        rows_probe = rows_probe[:probe_size]
    else:
        if needs_labels:
            _check_labelled(dataset, splits, list(splits), label_column)
        rows = [r for split in splits.values() for r in split if isinstance(r[0], str) and r[0].strip()]
        rows = list({text: (text, label) for text, label in reversed(rows)}.values())[::-1]  # first of duplicates
        # Never more than half the data: the rest must still train the model.
        rows_train, rows_probe = _hold_out(rows, min(probe_size, len(rows) // 2), rng, stratify=needs_labels)
    train_texts = {text for text, _ in rows_train}
    rows_probe = [r for r in rows_probe if r[0] not in train_texts]
    if len(rows_probe) < min_probe_size:
        raise DepthfastError(
            f"probe set too small: {len(rows_probe)} held-out texts from {dataset!r}, need at least {min_probe_size}"
        )
    if not rows_train:
        raise DepthfastError(f"dataset {dataset!r} leaves no training texts after holding out the probe set")
    task = Task(dataset, [t for t, _ in rows_train], [t for t, _ in rows_probe])
    if needs_labels:
        names = sorted({str(label) for _, label in rows_train + rows_probe})
        if len(names) < 2:
            raise DepthfastError(f"classification needs at least 2 distinct labels; {dataset!r} has {len(names)}")
        index = {name: i for i, name in enumerate(names)}
        task.label_names = names
        task.train_labels = [index[str(label)] for _, label in rows_train]
        task.probe_labels = [index[str(label)] for _, label in rows_probe]
    return task


def _check_labelled(dataset: str, splits: dict[str, list], names: list[str], label_column: str) -> None:
    """Refuse a split in use with unlabelled rows: a label of None or −1 would become a class of its own."""
    for name in names:
        unlabelled = sum(1 for _, label in splits[name] if label in UNLABELLED)
        if unlabelled:
            raise DepthfastError(
                f"dataset {dataset!r} split {name!r}: {unlabelled} of {len(splits[name])} rows have no label "
                f"(column {label_column!r} is None or -1, as in withheld test labels); classification needs "
                "labels on every row of the splits it uses"
            )


def _hold_out(rows: list, probe_size: int, rng: random.Random, stratify: bool) -> tuple[list, list]:
    rows = list(rows)
    rng.shuffle(rows)
    if not stratify:
        return rows[probe_size:], rows[:probe_size]
    # Stratified: each label contributes to the probe in proportion to its frequency.
    counts = Counter(str(label) for _, label in rows)
    exact = {label: probe_size * c / len(rows) for label, c in counts.items()}
    quota = {label: int(q) for label, q in exact.items()}
    # Largest remainders first, so the quotas add up to exactly probe_size.
    for label in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: probe_size - sum(quota.values())]:
        quota[label] += 1
    train, probe = [], []
    for row in rows:
        label = str(row[1])
        if quota[label] > 0:
            probe.append(row)
            quota[label] -= 1
        else:
            train.append(row)
    return train, probe
