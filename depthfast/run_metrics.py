"""results.json's ``metrics`` of one measurement, the same for a run, a compare and the Trainer callback:
the profile's shape (blocks only, like the locality gradient), its per-text bootstrap and the objective
distances at θ₀."""

from __future__ import annotations

from depthfast.metrics import PER_TEXT_ESTIMATOR, profile_metrics, slope_estimator_label
from depthfast.objective_distance import chance_normalized_loss, kernel_target_alignment


def run_metrics(cfg, task, model, measured, depths, changes, alignment) -> dict:
    """Profile shape (blocks only, like the locality gradient) and the objective distances at θ₀."""
    # the change moments where the probe gave them (small changes stay exact), else the triples
    per_text_change = getattr(measured, "per_text_change", None)
    form, per_text = ("change", per_text_change) if per_text_change is not None else ("hsic", measured.per_text_hsic)
    per_text = per_text[:, 1:] if per_text is not None else None
    metrics = profile_metrics(depths[1:], changes[1:], per_text_hsic=per_text, seed=cfg.seed, per_text_form=form)
    # Which estimator each slope is, so a report never compares two as one (locality_gradient is the
    # headline, from the run's own CKA; slope_per_text is token-level HSIC₁ per probe text).
    metrics["slope_estimator"] = slope_estimator_label(cfg.estimator, cfg.pooling)
    metrics["slope_per_text_estimator"] = PER_TEXT_ESTIMATOR if per_text is not None else None
    chance = task.num_labels if cfg.objective == "cls" else model.config.vocab_size
    metrics["initial_loss_normalized"] = chance_normalized_loss(measured.loss_base, chance)
    metrics["gradient_alignment_distance"] = alignment
    metrics["kernel_target_alignment"] = (
        kernel_target_alignment(measured.base_features, measured.labels, task.num_labels)
        if measured.base_features is not None else None)
    return metrics
