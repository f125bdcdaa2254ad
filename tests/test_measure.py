"""Profile arithmetic: the locality gradient, weight change, and how results are written."""

import json
import math

import pytest
import torch

from depthfast.measure import weight_changes
from depthfast.metrics import locality_gradient
from depthfast.results import atomic_write_json


def test_locality_gradient_by_hand():
    assert locality_gradient([1 / 3, 2 / 3, 1.0], [0.1, 0.2, 0.3]) == pytest.approx(0.3)
    assert locality_gradient([0.25, 0.5, 0.75, 1.0], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(-0.4)
    assert locality_gradient([0.5, 1.0], [0.2, 0.2]) == 0.0  # flat profile
    assert locality_gradient([1.0], [0.3]) is None  # one block: no slope, not NaN
    # OLS against numpy's least squares on an irregular profile
    x, y = [0.2, 0.4, 0.6, 0.8, 1.0], [0.01, 0.05, 0.02, 0.09, 0.2]
    slope = torch.linalg.lstsq(torch.tensor([[xi, 1.0] for xi in x], dtype=torch.float64),
                               torch.tensor(y, dtype=torch.float64).unsqueeze(1)).solution[0, 0]
    assert locality_gradient(x, y) == pytest.approx(float(slope), rel=1e-12)


def test_weight_changes_float64_and_zero_group():
    base = [("a", [torch.ones(3, 4), torch.zeros(2)]), ("zero", [torch.zeros(5)]), ("still", [torch.zeros(5)])]
    tuned = [("a", [torch.ones(3, 4) * 1.5, torch.ones(2)]), ("zero", [torch.ones(5)]), ("still", [torch.zeros(5)])]
    changes = weight_changes(base, tuned)
    assert changes["a"] == pytest.approx(math.sqrt((12 * 0.25 + 2) / 12))
    assert changes["zero"] is None  # moved from W₀ = 0: no relative change, never a 0 that reads "unchanged"
    assert changes["still"] == 0.0  # did not move: 0, whatever ‖W₀‖


def test_json_never_holds_nan(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(str(path), {"slope": float("nan"), "rows": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"slope": None, "rows": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
