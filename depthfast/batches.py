"""Tokenized batches for the three objectives, reproducible from a seed.

cls: input_ids, attention_mask, labels (batch,). mlm: 15 % of real, non-special tokens are
targets (80 % [MASK], 10 % random, 10 % kept), labels −100 elsewhere. clm: labels = input_ids with
padding at −100 (the model shifts them). All tensors (batch, seq) unless stated.

Probe batches are clean for every objective: ``input_ids`` are the unmodified texts, on which both
models' activations are compared. For mlm they also carry a masked copy, ``masked_input_ids`` with
its ``labels``, drawn once from the seed, on which the probe's masked-LM loss is scored.
"""

from __future__ import annotations

from typing import Iterator

import torch

from depthfast.errors import DepthfastError


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def content_tokens(batch: dict, tokenizer) -> torch.Tensor:
    """(batch, seq) bool: real tokens that are not special ([CLS], [SEP], …): the text's own tokens."""
    special = torch.tensor(
        [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in batch["input_ids"].tolist()],
        dtype=torch.bool,
    ).reshape(batch["input_ids"].shape)
    return batch["attention_mask"].bool() & ~special


def mask_tokens(batch: dict, tokenizer, probability: float, generator: torch.Generator) -> dict:
    input_ids = batch["input_ids"].clone()
    candidates = content_tokens(batch, tokenizer)
    targets = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    if not bool(targets.any()):  # a batch of very short texts: still give the loss one target
        first = candidates.nonzero()[:1]
        targets[first[:, 0], first[:, 1]] = True
    labels = torch.where(targets, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator)
    input_ids[targets & (draw < 0.8)] = tokenizer.mask_token_id
    randomize = targets & (draw >= 0.8) & (draw < 0.9)
    input_ids[randomize] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[randomize]
    return {**batch, "input_ids": input_ids, "labels": labels}


def make_batch(objective: str, tokenizer, texts: list[str], labels: list[int] | None, max_length: int,
               mlm_probability: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = tokenize(tokenizer, texts, max_length)
    if objective == "cls":
        return {**batch, "labels": torch.tensor(labels, dtype=torch.long)}
    if objective == "mlm":
        return mask_tokens(batch, tokenizer, mlm_probability, generator)
    labels_clm = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels_clm}


def training_batches(objective: str, tokenizer, texts: list[str], labels: list[int] | None, batch_size: int,
                     max_length: int, mlm_probability: float, seed: int, start_step: int = 0
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded batches: each epoch a fresh permutation; batch k is the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        order = torch.randperm(len(texts), generator=generator).tolist()
        for begin in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[begin:begin + batch_size]
            batch = make_batch(objective, tokenizer, [texts[i] for i in idx],
                               [labels[i] for i in idx] if labels is not None else None,
                               max_length, mlm_probability, generator)
            if step >= start_step:
                yield batch
            step += 1


def probe_batches(objective: str, tokenizer, texts: list[str], labels: list[int] | None, batch_size: int,
                  max_length: int, mlm_probability: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """The held-out probe set in fixed batches, clean for every objective; for mlm each batch also
    holds its masked copy (``masked_input_ids``, ``labels``), drawn once from the seed.

    Raises DepthfastError when no probe text has a token of its own after tokenization (a column of
    control characters, say): there would be nothing to compare.
    """
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    batches, content = [], 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if objective == "mlm":
            clean = tokenize(tokenizer, chunk, max_length)
            masked = mask_tokens(clean, tokenizer, mlm_probability, generator)
            batch = {**clean, "masked_input_ids": masked["input_ids"], "labels": masked["labels"]}
        else:
            batch = make_batch(objective, tokenizer, chunk, labels[i:i + batch_size] if labels is not None else None,
                               max_length, mlm_probability, generator)
        content += int(content_tokens(batch, tokenizer).sum())
        batches.append(batch)
    if texts and content == 0:
        raise DepthfastError(f"all {len(texts)} probe texts are empty after tokenization (first: {texts[0][:40]!r}); "
                             "check --text-column and the dataset's contents")
    return batches
