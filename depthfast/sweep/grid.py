"""The grid file: reading and checking it (``load_grid``, ``parse_grid``) and expanding it into the
fields of every run (``expand``). The schema and its rules are in the ``depthfast.sweep`` docstring."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

from depthfast.config import OBJECTIVES, RunConfig, read_data_file
from depthfast.errors import DepthfastError
from depthfast.models import check_objective
from depthfast.registry import lookup


TOP_LEVEL_KEYS = ("out", "base", "grid", "models", "per_objective")


@dataclass
class Grid:
    out: str
    base: dict
    grid: dict = field(default_factory=dict)
    models: list[dict] | None = None  # [{"model": id, "objectives": [...], <RunConfig field>: value}]
    per_objective: dict = field(default_factory=dict)  # objective → {RunConfig field: value}


def load_grid(path: str) -> Grid:
    """Read and check a grid YAML file (schema in the depthfast.sweep docstring)."""
    data = read_data_file(path, "grid file", fmt="yaml")
    return parse_grid(data, source=path)


def parse_grid(data, source: str = "grid") -> Grid:
    if not isinstance(data, dict):
        raise DepthfastError(f"{source}: the grid file must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise DepthfastError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL_KEYS)}")
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    out = data.get("out")
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise DepthfastError(f"{source}: 'base' and 'grid' must be mappings of RunConfig fields")
    known = [f.name for f in fields(RunConfig)]
    for section, mapping in (("base", base), ("grid", grid)):
        bad = sorted(set(mapping) - set(known))
        if bad:
            raise DepthfastError(f"{source}: unknown {section} key(s) {', '.join(map(str, bad))}; "
                                 f"RunConfig fields: {', '.join(known)}")
        if "out" in mapping:
            raise DepthfastError(f"{source}: 'out' cannot be set in {section}; the sweep names each run's directory")
    both = sorted(set(base) & set(grid))
    if both:
        raise DepthfastError(f"{source}: key(s) {', '.join(both)} are in both base and grid; keep one")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise DepthfastError(f"{source}: grid.{key} must be a non-empty list; got {values!r}")
    if out is not None and not isinstance(out, str):
        raise DepthfastError(f"{source}: 'out' must be a directory path; got {out!r}")
    per_objective = _parse_per_objective(data.get("per_objective"), grid, known, source)
    models = _parse_models(data["models"], base, grid, known, source) if "models" in data else None
    return Grid(out=out, base=dict(base), grid=dict(grid), models=models, per_objective=per_objective)


def _parse_per_objective(data, grid: dict, known: list[str], source: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DepthfastError(f"{source}: 'per_objective' must map objectives ({', '.join(OBJECTIVES)}) to RunConfig fields")
    out = {}
    for objective, settings in data.items():
        where = f"per_objective.{objective}"
        if objective not in OBJECTIVES:
            raise DepthfastError(f"{source}: unknown objective {objective!r} in per_objective; known: {', '.join(OBJECTIVES)}")
        if not isinstance(settings, dict):
            raise DepthfastError(f"{source}: {where} must be a mapping of RunConfig fields; got {settings!r}")
        _check_fields(settings, known, where, source, forbidden=("out", "model", "objective"))
        clash = sorted(set(settings) & set(grid))
        if clash:
            raise DepthfastError(f"{source}: {', '.join(clash)} in both {where} and grid; keep one")
        out[objective] = dict(settings)
    return out


def _parse_models(data, base: dict, grid: dict, known: list[str], source: str) -> list[dict]:
    if not isinstance(data, list) or not data:
        raise DepthfastError(f"{source}: 'models' must be a non-empty list of {{model: ID, objectives: [...], ...}}")
    for where, mapping in (("base", base), ("grid", grid)):
        if "model" in mapping:
            raise DepthfastError(f"{source}: 'model' is in {where} and 'models' is given; list every model under models")
    entries = []
    for i, entry in enumerate(data):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise DepthfastError(f"{source}: {where} must be a mapping with 'model: ID'; got {entry!r}")
        where = f"models[{i}] ({entry['model']})"
        if "objective" in entry:
            raise DepthfastError(f"{source}: {where} has 'objective'; use 'objectives: [...]' (a list)")
        settings = {k: v for k, v in entry.items() if k not in ("model", "objectives")}
        _check_fields(settings, known, where, source, forbidden=("out",), extra=("model", "objectives"))
        clash = sorted(set(settings) & set(grid))
        if clash:
            raise DepthfastError(f"{source}: {', '.join(clash)} in both {where} and grid; keep one")
        objectives = entry.get("objectives")
        if objectives is not None:
            if not isinstance(objectives, list) or not objectives or len(set(map(str, objectives))) != len(objectives):
                raise DepthfastError(f"{source}: {where}: 'objectives' must be a non-empty list without repeats; "
                                     f"got {objectives!r}")
            bad = [o for o in objectives if o not in OBJECTIVES]
            if bad:
                raise DepthfastError(f"{source}: {where}: unknown objective(s) {', '.join(map(str, bad))}; "
                                     f"known: {', '.join(OBJECTIVES)}")
            if "objective" in grid:
                raise DepthfastError(f"{source}: {where} lists objectives and grid has 'objective'; keep one")
            _check_admits(entry["model"], objectives, where, source)
        entries.append(dict(entry))
    return entries


def _check_fields(mapping: dict, known: list[str], where: str, source: str, forbidden=(), extra=()) -> None:
    bad = sorted(set(map(str, mapping)) - set(known))
    if bad:
        raise DepthfastError(f"{source}: unknown key(s) {', '.join(bad)} in {where}; "
                             f"allowed: {', '.join([*extra, *known])}")
    for key in forbidden:
        if key in mapping:
            raise DepthfastError(f"{source}: '{key}' cannot be set in {where}")


def _check_admits(model: str, objectives: list[str], where: str, source: str) -> None:
    """A registry model's objectives are checked from its config (no download); others at run time."""
    spec = lookup(model)
    if spec is None:
        return
    for objective in objectives:
        try:
            check_objective(spec.config(), objective)
        except DepthfastError as exc:
            raise DepthfastError(f"{source}: {where}: {exc}") from None


def expand(grid: Grid) -> list[dict]:
    """Every run's fields: for each models entry (or once, without ``models``), for each of its
    objectives, the product of the grid lists in file order (the last key varies fastest). Fields,
    later winning: base, per_objective[objective], the models entry, the grid values."""
    keys = list(grid.grid)
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*(grid.grid[k] for k in keys))] if keys else [{}]
    out = []
    for entry in grid.models or [{}]:
        settings = {k: v for k, v in entry.items() if k != "objectives"}
        for objective in entry.get("objectives") or [None]:
            for combo in combos:
                chosen = objective or combo.get("objective") or grid.base.get("objective") or RunConfig().objective
                values = {**grid.base, **grid.per_objective.get(chosen, {}), **settings, **combo}
                if objective:
                    values["objective"] = objective
                out.append(values)
    return out
