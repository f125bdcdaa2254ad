"""The project's performance and accuracy targets, and what the benchmarks measured, as one table.

A benchmark calls ``record(key, value, detail)`` where it computes a ratio; when the environment
variable DEPTHFAST_TARGETS names a file (benchmarks/gpu_check.sh sets it), each call appends one JSON
line there, otherwise it does nothing. Then

    python benchmarks/targets.py FILE

prints one row per target: the bound, the worst value measured over the benchmark's cases (the
largest for a "≤" target, the smallest for "≥"), met or not, and "not measured" where no benchmark
reported (a step skipped or stopped by the time budget). Exit status 0 whatever the outcome: the table
is the result. Ratios mean something on a GPU; a CPU run of the same benchmarks fills the table too,
labelled with the device it came from.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str
    what: str  # the ratio, stated so that the bound reads naturally
    bound: float
    at_most: bool  # True: value ≤ bound is met; False: value ≥ bound


TARGETS = (
    Target("optim_equal_step", "fused equal-step AdamW step time / torch fused AdamW (bytes floor 36/28 = 1.29)",
           1.5, True),
    Target("cka_exact", "torch bmm (shifted, equal accuracy) time / exact CKA engine time, one width (change form)",
           1.3, False),
    Target("cka_unbiased", "materialized-Gram HSIC₁ time / unbiased engine time, one width (change form)", 3.0, False),
    Target("measure_share", "CKA statistics' cost over the two forwards with hooks (fraction)", 0.10, True),
    Target("train_tokens", "training tokens/s with the equal-step control / plain AdamW", 0.95, False),
    Target("accuracy_fp32", "relative error of 1 − CKA vs the float64 change truth, fp32 (1e-1 … 1e-8)", 1e-4, True),
    Target("change_update", "StreamingCKA.update time, change-relative statistics / the old X, Y statistics",
           1.05, True),
    Target("accuracy_16bit", "relative error of 1 − CKA vs the float64 change truth, bf16/fp16 operands", 2e-2, True),
)
_BY_KEY = {t.key: t for t in TARGETS}


def record(key: str, value: float, detail: str = "") -> None:
    """Append one measurement of target ``key`` to $DEPTHFAST_TARGETS (no-op when unset)."""
    if key not in _BY_KEY:
        raise KeyError(f"unknown target {key!r}; known: {sorted(_BY_KEY)}")
    path = os.environ.get("DEPTHFAST_TARGETS")
    if not path:
        return
    import torch  # the device the figure came from, on every line

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, "value": float(value), "detail": detail, "device": device}) + "\n")


def worst(target: Target, rows: list[dict]) -> dict | None:
    """The measurement of ``target`` farthest on the wrong side: max for ≤ targets, min for ≥."""
    mine = [r for r in rows if r["key"] == target.key]
    if not mine:
        return None
    return (max if target.at_most else min)(mine, key=lambda r: r["value"])


def table(rows: list[dict]) -> str:
    lines = [f"{'target':<18} {'bound':>9} {'measured':>10}  {'':<5} what (worst case; device)"]
    for t in TARGETS:
        w = worst(t, rows)
        bound = f"{'≤' if t.at_most else '≥'} {t.bound:g}"
        if w is None:
            lines.append(f"{t.key:<18} {bound:>9} {'—':>10}  {'n/m':<5} {t.what} (not measured)")
            continue
        met = w["value"] <= t.bound if t.at_most else w["value"] >= t.bound
        lines.append(f"{t.key:<18} {bound:>9} {w['value']:>10.3g}  {'met' if met else 'MISS':<5} {t.what} "
                     f"({w['detail']}; {w['device']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/targets.py FILE  (the JSON lines benchmarks wrote under DEPTHFAST_TARGETS)",
              file=sys.stderr)
        return 2
    rows = []
    if os.path.exists(argv[0]):
        with open(argv[0]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
