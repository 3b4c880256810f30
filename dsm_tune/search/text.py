"""Plain helpers every surface shares, including the base-install commands (`measure`, `verify`): numbers, JSON-safe
copies, a config in one line, plain-text tables. Standard library only, so they import without the tuner's
packages."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def json_safe(value: Any) -> Any:
    """A JSON-safe copy for study attrs and frozen configs: NaN/inf become null (strict JSON forbids them),
    tuples become lists, numpy/torch scalars become Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return json_safe(value.item())
    return value


def number_text(value: Any, digits: int = 3) -> str:
    """A figure with `digits` decimals, '-' when there is none."""
    return f"{value:.{digits}f}" if isinstance(value, float) and is_finite_number(value) else "-"


def interval_text(low: Any, high: Any, digits: int = 2) -> str:
    """A 95% interval as '[low, high]', '-' when there is none (a trial from before intervals existed)."""
    if not all(isinstance(v, float) and is_finite_number(v) for v in (low, high)):
        return "-"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def describe_config(config: Any) -> str:
    """Short text of a merge config, e.g. 'd=3 D=1 4x0.10 5xr2 +prop' (start layer, hierarchy depth, one
    blocks x ratio-or-r per stage, proportional attention). Takes a DSMConfig, its document, its JSON text or
    its merge part."""
    if hasattr(config, "merge_dict"):
        config = config.merge_dict()
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            return config
    if not isinstance(config, dict):
        return ""
    merge = config.get("merge", config)
    stages = " ".join(
        f"{s.get('blocks')}x{s['ratio']:.2f}" if s.get("ratio") is not None else f"{s.get('blocks')}xr{s.get('r')}"
        for s in merge.get("stages", []))
    prop = " +prop" if merge.get("proportional_attention") else ""
    return f"d={merge.get('start_layer')} D={merge.get('hierarchy_depth')} {stages}{prop}".strip()


def format_table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = ()) -> str:
    """Plain-text table: numbers right-aligned, the columns in `left` (and the last) left-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    last = len(widths) - 1
    lines = ["  ".join(str(cell).ljust(width) if i in left or i == last else str(cell).rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths)))
             for line in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(line.rstrip() for line in lines)
