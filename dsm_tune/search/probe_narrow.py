"""`run --probe`: narrow a search space's start layers (and the first stage's ratios) around the probe's
convergence block, before the study spends trials where real data already says merging hurts.

`narrow_space` is a pure function on the space file's mapping (the YAML as read), so it works before the space is
bound to a model and leaves the parser as the one place that checks a space. It returns the narrowed mapping and an
explanation (what changed, from what, and why) that the study records.

The rule:
- start layers: the probe's convergence block `c`, plus or minus a margin of `max(1, round(L / 12))` blocks
  (one block at 12 blocks: the real ViT-S's block moved by one between 16 and 64 probe images), kept inside the
  space's own range where the two overlap. Starts at `c - 1` and `c + 1` (where they exist) always stay possible,
  even when that means reaching outside the space's range: the probe has measured where the model converges,
  the file only guessed it for a whole model family.
- first stage: it merges at the start layer, where neighbouring patch keys are `s_c / max_b s_b` as alike as they
  become at most (`s` is the probe's neighbour key cosine), so the upper bound of its merge amount is scaled by
  that share: `stage_ratio` of the first stage in a sampled space (snapped down to the ratio grid, never below one
  grid step above the low bound; later stages keep their range), `front_loading` in a traced (shape + budget)
  space. This part is a heuristic: benchmarks/probe_value.py measures whether it pays.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import yaml

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.probe import ProbeResult
from dsm_tune.search.strategies.sampled import DEFAULT_RATIO_STEP, RATIO_DIGITS



class ProbeNarrowError(DSMTuneError):
    """A search space `--probe` cannot narrow (its start layer is pinned), or a probe of another model."""


def start_margin(num_blocks: int) -> int:
    """Blocks kept on either side of the convergence block."""
    return max(1, round(num_blocks / 12))


def _pair(value: Any, key: str) -> tuple[float, float]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise ProbeNarrowError(f"--probe cannot read the space's {key}: expected [low, high] or one number, "
                               f"got {value!r}")
    return float(items[0]), float(items[1])


def start_range(mapping: Mapping[str, Any], num_blocks: int) -> tuple[str, tuple[int, int]]:
    """The space's start-layer key and its range in blocks (fractions floored, as the space parser does)."""
    if ("start_layer" in mapping) == ("start_layer_fraction" in mapping):
        raise ProbeNarrowError("--probe needs the search space to give exactly one of start_layer or "
                               "start_layer_fraction")
    key = "start_layer" if "start_layer" in mapping else "start_layer_fraction"
    low, high = _pair(mapping[key], key)
    if key == "start_layer_fraction":
        low, high = math.floor(low * num_blocks), math.floor(high * num_blocks)
    return key, (int(low), int(high))


def narrow_space(mapping: Mapping[str, Any], probe: ProbeResult,
                 num_blocks: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The space narrowed by the probe, and what was narrowed and why (JSON-safe)."""
    if probe.num_blocks != num_blocks:
        raise ProbeNarrowError(f"the probe was measured on a {probe.num_blocks}-block model ({probe.model}) but the "
                               f"study's model has {num_blocks} blocks; probe the study's model")
    key, (low, high) = start_range(mapping, num_blocks)
    if low == high:
        raise ProbeNarrowError(f"the search space pins the start layer ({key}: {mapping[key]!r} -> block {low}), so "
                               "--probe has nothing to narrow; give it a range (e.g. start_layer: [0, 6]) or leave "
                               "out --probe")
    narrowed = copy.deepcopy(dict(mapping))
    block = probe.convergence_block
    explanation: dict[str, Any] = {
        "probe": {"model": probe.model, "num_images": probe.num_images, "data": probe.data},
        "convergence_block": block, "rule": probe.rule,
    }
    if block is None:
        explanation["start_layer"] = {"before": [low, high], "after": [low, high], "changed": False,
                                      "why": "the probe found no convergence block; start layers kept"}
        explanation["first_stage"] = {"key": None, "changed": False,
                                      "why": "no convergence block to measure the redundancy at"}
        return narrowed, explanation

    new_range, why = _narrow_start(block, low, high, num_blocks)
    # The narrowed range is in blocks; it takes the place of the space's own key (a fraction becomes blocks).
    narrowed = {("start_layer" if name == key else name): (list(new_range) if name == key else value)
                for name, value in narrowed.items()}
    explanation["start_layer"] = {"key_before": key, "space_value": _plain(mapping[key]), "before": [low, high],
                                  "after": list(new_range), "changed": list(new_range) != [low, high], "why": why}
    explanation["first_stage"] = _narrow_first_stage(narrowed, probe, block)
    return narrowed, explanation


def _narrow_start(block: int, low: int, high: int, num_blocks: int) -> tuple[tuple[int, int], str]:
    margin = start_margin(num_blocks)
    last_start = num_blocks - 1   # a start at L-1 still merges in the last block
    new_low, new_high = max(low, block - margin), min(high, block + margin)
    # Never so narrow that the blocks next to the probe's cannot be sampled.
    new_low = min(new_low, max(0, block - 1))
    new_high = max(new_high, min(last_start, block + 1))
    why = f"convergence block {block} +- {margin} (margin max(1, round({num_blocks} blocks / 12)))"
    if new_low < low or new_high > high:
        neighbours = " and ".join(str(b) for b in (block - 1, block + 1) if 0 <= b <= last_start)
        why += f"; reaches outside the space's [{low}, {high}] so that block(s) {neighbours} stay possible"
    else:
        why += f", within the space's [{low}, {high}]"
    return (new_low, new_high), why


def _redundancy_share(probe: ProbeResult, block: int) -> tuple[float, str]:
    similarity = probe.curve("neighbour_similarity")
    peak = max(similarity)
    share = min(1.0, max(0.0, similarity[block]) / peak) if peak > 0 else 1.0
    return share, (f"neighbour key cosine at block {block} is {similarity[block]:.3f}, {share:.2f} of its peak "
                   f"{peak:.3f}")


def _narrow_first_stage(narrowed: dict[str, Any], probe: ProbeResult, block: int) -> dict[str, Any]:
    """Scale the upper bound of the first stage's merge amount by the redundancy at the convergence block:
    `stage_ratio` (its first stage) in a sampled space, `front_loading` (how much the early blocks merge) in a
    traced one."""
    if "stage_ratio" in narrowed:
        return _narrow_first_ratio(narrowed, probe, block)
    if "front_loading" in narrowed:
        low, high = _pair(narrowed["front_loading"], "front_loading")
        if low == high:
            return {"key": "front_loading", "changed": False, "before": [low, high],
                    "why": "the space fixes front_loading"}
        share, measured = _redundancy_share(probe, block)
        new_high = round(low + share * (high - low), 4)
        narrowed["front_loading"] = [low, new_high]
        return {"key": "front_loading", "before": [low, high], "after": [low, new_high],
                "changed": new_high != high, "share": round(share, 4),
                "why": f"{measured}; the upper front-loading bound is scaled by that share"}
    return {"key": None, "changed": False,
            "why": "the space has neither stage_ratio nor front_loading; the first stage's merge amount is kept"}


def _narrow_first_ratio(narrowed: dict[str, Any], probe: ProbeResult, block: int) -> dict[str, Any]:
    value = narrowed["stage_ratio"]
    per_stage = isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, (list, tuple)) for v in value)
    low, high = _pair(value[0] if per_stage else value, "stage_ratio")
    if low == high:
        return {"key": "stage_ratio", "changed": False, "before": [low, high],
                "why": "the first stage's ratio is fixed by the space"}
    share, measured = _redundancy_share(probe, block)
    step = float(narrowed.get("ratio_step", DEFAULT_RATIO_STEP))
    steps = math.floor(((high - low) * share) / step + 1e-9)
    new_high = min(round(low + max(1, steps) * step, RATIO_DIGITS), high)
    ranges = [list(r) for r in value] if per_stage else [[low, high] for _ in range(_max_stages(narrowed))]
    ranges[0] = [low, new_high]
    narrowed["stage_ratio"] = ranges
    return {"key": "stage_ratio", "before": [low, high], "after": [low, new_high], "changed": new_high != high,
            "share": round(share, 4),
            "why": f"{measured}; the first stage's upper ratio is scaled by that share (snapped down to the "
                   f"ratio_step grid; later stages keep [{low:g}, {high:g}])"}


# What `run --probe` leaves in the study folder: the probe it used and the narrowed space the study starts from.
PROBE_COPY = "probe.json"
NARROWED_SPACE = "space.probe.yaml"


def summary(explanation: Mapping[str, Any]) -> str:
    """One line of what was narrowed (the MLflow parent run's `probe_narrowing` tag, the run command's notice)."""
    block = explanation.get("convergence_block")
    parts = [f"convergence block {block}" if block is not None else "no convergence block"]
    start, first = explanation.get("start_layer") or {}, explanation.get("first_stage") or {}
    if start.get("changed"):
        parts.append(f"start_layer {start['before']} -> {start['after']}")
    if first.get("changed"):
        parts.append(f"first stage {first['key']} {first['before']} -> {first['after']}")
    if len(parts) == 1:
        parts.append("space unchanged")
    return "; ".join(parts)


def narrow_study_space(spec: Any, probe: ProbeResult) -> dict[str, Any]:
    """Start a new study from its space narrowed by `probe`.

    Writes the probe and the narrowed space into the study folder, points `spec.space` at the narrowed file (so a
    resume reads the same space back) and records `spec.probe` and `spec.probe_narrowing` (the explanation, also
    returned), which the study stores in its `spec` attr, spec.json and the MLflow parent run.
    """
    from dsm_tune.evaluation.models import resolve_model_name
    from dsm_tune.search.space import precheck_space
    from dsm_tune.search.study.preflight import study_space_text

    if resolve_model_name(probe.model) != resolve_model_name(spec.model):
        raise ProbeNarrowError(f"the probe was measured on {probe.model}, the study tunes {spec.model}; probe the "
                               f"study's model (dsm-tune probe --model {spec.model} ...)")
    text, source = study_space_text(spec, spec.folder, resumed=False)
    precheck_space(text, source)
    narrowed, explanation = narrow_space(yaml.safe_load(text), probe, probe.num_blocks)
    explanation["space_source"] = str(source)
    explanation["summary"] = summary(explanation)
    folder = spec.folder.path
    folder.mkdir(parents=True, exist_ok=True)
    probe_path, space_path = folder / PROBE_COPY, folder / NARROWED_SPACE
    probe.to_json(probe_path)
    header = (f"# {source} narrowed by `dsm-tune run --probe` ({explanation['summary']}); what and why: "
              f"spec.json probe_narrowing\n")
    space_path.write_text(header + yaml.safe_dump(narrowed, sort_keys=False, default_flow_style=None))
    spec.space, spec.probe, spec.probe_narrowing = str(space_path), str(probe_path), explanation
    return explanation


def _max_stages(mapping: Mapping[str, Any]) -> int:
    if "num_stages" not in mapping:
        return 1
    return int(_pair(mapping["num_stages"], "num_stages")[1])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


__all__ = ["narrow_space", "narrow_study_space", "summary", "ProbeNarrowError", "start_range", "start_margin",
           "PROBE_COPY", "NARROWED_SPACE"]
