"""Names that several layers share (a leaf: imports nothing from depthfast). The modules that own each
concept re-export them (depthfast.cka: ESTIMATORS, MEASURES, POOLINGS; depthfast.config: TIED_EMBEDDINGS)."""

from __future__ import annotations

ESTIMATORS = ("exact", "unbiased")  # how StreamingCKA estimates HSIC (depthfast.cka.streaming)
MEASURES = ("linear", "debiased", "procrustes")  # what StreamingCKA reports per layer
POOLINGS = ("token", "mean")  # token-level rows, or one mean-pooled row per text (depthfast.cka.reference)
TIED_EMBEDDINGS = ("head", "embeddings")  # who owns a tied input/output matrix (depthfast.layers)
# GPU bytes for the per-text Grams of one chunk of texts (depthfast.metrics.per_text; its peak in
# depthfast.memory.per_text_hsic_bytes)
PER_TEXT_GRAM_BYTES = 256 * 2**20
