"""Statistics per group of runs, one headline estimator at a time: seed groups (runs that differ in the
seed only) with the slope's spread over seeds, equal-step vs none comparisons of seed groups paired by seed
(``depthfast.metrics.verdict``, rule ``PERSISTENCE_RULE``), and steepness-vs-distance correlations over runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from depthfast.config import RunConfig
from depthfast.metrics import Verdict, pearson_ci, seed_summary, verdict
from depthfast.objective_distance import OBJECTIVE_DISTANCE_KEYS
from depthfast.report.records import RunRecord, estimator_of, headline_slope, source_of, tied_of
from depthfast.terminal import fmt_cell


# Config fields that do not change what a run measures: runs differing only in these (and the seed)
# are seeds of one group.
NOT_A_SETTING = ("out", "seed", "device", "tensorboard", "no_memory_check", "checkpoint_every", "keep_checkpoints",
                 "measure_at", "theta0_offload", "save_model", "offload")
# Shown in their own columns, so left out of the "settings" text.
OWN_COLUMNS = ("model", "objective", "control", "estimator", "pooling")
SEED_CI = "95% CI over seeds (t)"


def mean_of(values):
    """Mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def sd_of(values):
    """Sample standard deviation (n − 1) of the values that are not None; None with fewer than two."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _settings_of(record: RunRecord) -> dict:
    config = dict(record.config)
    if record.has_config and source_of(record) == "run":  # fields added later default to what the older run did
        config = {**RunConfig().to_dict(), **config}
    return {k: v for k, v in config.items() if k not in NOT_A_SETTING}


def _varying(records: list[RunRecord]) -> list[str]:
    """Settings (other than the own-column ones) whose value differs between the ok runs."""
    seen: dict[str, set] = {}
    for r in records:
        for k, v in _settings_of(r).items():
            seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    return sorted(k for k, vs in seen.items() if len(vs) > 1 and k not in OWN_COLUMNS)


@dataclass
class SeedGroup:
    """Runs that share model, objective, control and every other setting: they differ in the seed only."""

    estimator: str
    model: str
    block_type: str
    architecture: str
    objective: str
    control: str
    tied: str
    settings: str  # the varying settings other than the own columns, "lr=5e-05, steps=30"
    key: str  # everything but the control: the pairing key of the control comparison
    runs: list[RunRecord]
    slope: dict  # seed_summary of the headline slopes

    @property
    def seeds(self) -> list:
        return sorted((r.get("seed") for r in self.runs), key=lambda s: (s is None, s))


def seed_groups(records: list[RunRecord]) -> list[SeedGroup]:
    ok = [r for r in records if r.ok]
    varying = _varying(ok)
    groups: dict[str, list[RunRecord]] = {}
    for r in ok:
        settings = _settings_of(r)
        ident = {**settings, "_estimator": estimator_of(r), "_block_type": r.get("block_type"), "_tied": tied_of(r)}
        groups.setdefault(json.dumps(ident, sort_keys=True, default=str), []).append(r)
    out = []
    for ident, rs in groups.items():
        first = rs[0]
        settings = _settings_of(first)
        key = json.loads(ident)
        key.pop("control", None)
        out.append(SeedGroup(
            estimator=estimator_of(first), model=str(first.get("model") or "?"),
            block_type=str(first.get("block_type") or "?"), architecture=str(first.get("architecture") or "?"),
            objective=str(first.get("objective") or "?"), control=str(first.get("control") or "?"),
            tied=tied_of(first), settings=", ".join(f"{k}={fmt_cell(settings.get(k))}" for k in varying) or "—",
            key=json.dumps(key, sort_keys=True), runs=rs, slope=seed_summary([headline_slope(r) for r in rs])))
    return sorted(out, key=lambda g: (g.estimator, g.block_type, g.objective, g.control, g.model, g.tied, g.settings))


def by_estimator(items, estimator=lambda item: item.estimator) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        out.setdefault(estimator(item), []).append(item)
    return dict(sorted(out.items()))


@dataclass
class Comparison:
    """none vs equal-step of two seed groups that differ in the control only; ``result`` is the
    ``depthfast.metrics.verdict`` of their headline slopes, paired by seed."""

    estimator: str
    none: SeedGroup
    equal: SeedGroup
    result: Verdict

    @property
    def verdict(self) -> str:
        return self.result.verdict

    @property
    def reason(self) -> str:
        return self.result.reason


def slopes_by_seed(group: SeedGroup) -> dict | None:
    """seed → headline slope of a seed group; None when a seed is missing or repeated (no pairing then)."""
    seeds = [r.get("seed") for r in group.runs]
    if any(s is None for s in seeds) or len(set(map(str, seeds))) != len(seeds):
        return None
    return {str(s): headline_slope(r) for s, r in zip(seeds, group.runs)}


def comparisons(records: list[RunRecord]) -> list[Comparison]:
    """Equal-step vs none for every pair of seed groups that differ in the control only, paired by seed
    (unpaired when a group's seeds are missing or repeated)."""
    groups = seed_groups(records)
    pairs: dict[str, dict[str, SeedGroup]] = {}
    for g in groups:
        pairs.setdefault(g.key, {})[g.control] = g
    out = []
    for sides in pairs.values():
        if "none" in sides and "equal-step" in sides:
            none, eq = sides["none"], sides["equal-step"]
            by_seed = slopes_by_seed(none), slopes_by_seed(eq)
            if by_seed[0] is not None and by_seed[1] is not None:
                result = verdict(by_seed[0], by_seed[1], paired=True)
            else:
                result = verdict([headline_slope(r) for r in none.runs], [headline_slope(r) for r in eq.runs],
                                 paired=False)
            out.append(Comparison(none.estimator, none, eq, result))
    return sorted(out, key=lambda c: (c.estimator, c.none.block_type, c.none.objective, c.none.model, c.none.tied))


def correlations(records: list[RunRecord], resamples: int) -> list[dict]:
    """Per headline estimator, Pearson r of steepness with each objective distance over the ok runs,
    with a bootstrap CI over runs. Each dict: {"estimator", "distance", "r", "ci_low", "ci_high", "n", …}."""
    out = []
    for est, ok in by_estimator([r for r in records if r.ok], estimator_of).items():
        for key in OBJECTIVE_DISTANCE_KEYS:
            xs = [r.metrics.get(key) for r in ok]
            ys = [r.metrics.get("steepness") for r in ok]
            out.append({"estimator": est, "distance": key, **pearson_ci(xs, ys, num_resamples=resamples)})
    return out
