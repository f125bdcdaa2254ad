"""Numbers computed from depth profiles: pure functions (plain lists / tensors in, floats or None out),
so each can be checked by hand. "Undefined" is always ``None``, never NaN (results.json has no NaN).

    depthfast.metrics.profile    one profile's shape: locality gradient, steepness, width, profile_metrics
    depthfast.metrics.per_text   per-text HSIC₁ triples of the probe set and the bootstrap CI of the slope
    depthfast.metrics.stats      across runs: pearson_ci, seed_summary (Student t), ratio_ci,
                                 persistence_verdict and its PERSISTENCE_RULE
    depthfast.objective_distance the training-free objective distances at θ₀ (chance-normalized loss,
                                 gradient-alignment distance, kernel-target alignment), re-exported here

Every public name is importable from ``depthfast.metrics`` itself.
"""

from depthfast.metrics.per_text import PER_TEXT_ESTIMATOR, bootstrap_slope_ci, per_text_hsic, per_text_hsic_batch
from depthfast.metrics.profile import (STEEPNESS_FLOOR, locality_gradient, profile_metrics, slope_estimator_label,
                                       steepness, width)
from depthfast.metrics.stats import (PERSISTENCE_RULE, PERSISTENCE_THRESHOLD, pearson_ci, persistence_verdict,
                                     ratio_ci, seed_summary, t_cdf, t_quantile)

# depthfast.objective_distance imports depthfast.metrics (its _finite), so its names are served on first
# use rather than imported here: an eager import would be circular when objective_distance loads first.
_OBJECTIVE_DISTANCE_NAMES = ("OBJECTIVE_DISTANCE_KEYS", "chance_normalized_loss", "gradient_alignment_distance",
                             "kernel_target_alignment")


def __getattr__(name: str):
    if name in _OBJECTIVE_DISTANCE_NAMES:
        from depthfast import objective_distance

        return getattr(objective_distance, name)
    raise AttributeError(f"module 'depthfast.metrics' has no attribute {name!r}")


__all__ = ["PER_TEXT_ESTIMATOR", "bootstrap_slope_ci", "per_text_hsic", "per_text_hsic_batch", "STEEPNESS_FLOOR",
           "locality_gradient", "profile_metrics", "slope_estimator_label", "steepness", "width", "PERSISTENCE_RULE",
           "PERSISTENCE_THRESHOLD", "pearson_ci", "persistence_verdict", "ratio_ci", "seed_summary", "t_cdf",
           "t_quantile", *_OBJECTIVE_DISTANCE_NAMES]


def __dir__():
    return sorted(set(globals()) | set(_OBJECTIVE_DISTANCE_NAMES))
