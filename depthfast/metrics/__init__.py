"""Numbers computed from depth profiles: pure functions (plain lists / tensors in, floats or None out),
so each can be checked by hand. "Undefined" is always ``None``, never NaN (results.json has no NaN).

    depthfast.metrics.profile    one profile's shape: locality gradient, steepness, width, profile_metrics
    depthfast.metrics.per_text   per-text HSIC₁ triples of the probe set and the bootstrap CI of the slope
    depthfast.metrics.stats      across runs: pearson_ci, seed_summary (Student t), and the equal-step
                                 vs none verdict (R with Fieller's interval, paired by seed; the
                                 seeds a decisive verdict needs) and its PERSISTENCE_RULE

Every public name is importable from ``depthfast.metrics`` itself. The training-free objective
distances at θ₀ (chance-normalized loss, gradient-alignment distance, kernel-target alignment) live
with the code that measures them, in ``depthfast.objective_distance``.
"""

from depthfast.metrics.per_text import PER_TEXT_ESTIMATOR, bootstrap_slope_ci, per_text_hsic, per_text_hsic_batch
from depthfast.metrics.profile import (STEEPNESS_FLOOR, locality_gradient, profile_metrics, slope_estimator_label,
                                       steepness, width)
from depthfast.metrics.stats import (PERSISTENCE_RULE, PERSISTENCE_THRESHOLD, SEEDS_NEEDED_POWER, Verdict, decide,
                                     fieller_interval, pearson_ci, seed_summary, t_cdf, t_quantile, verdict)

__all__ = ["PER_TEXT_ESTIMATOR", "bootstrap_slope_ci", "per_text_hsic", "per_text_hsic_batch", "STEEPNESS_FLOOR",
           "locality_gradient", "profile_metrics", "slope_estimator_label", "steepness", "width", "PERSISTENCE_RULE",
           "PERSISTENCE_THRESHOLD", "SEEDS_NEEDED_POWER", "Verdict", "decide", "fieller_interval", "pearson_ci",
           "seed_summary", "t_cdf", "t_quantile", "verdict"]
