"""The DSM merge config: its schema, validation, and the frozen JSON hand-off document.

The JSON document is the contract between the tuner and deployment teams, so loading is strict: an unknown
format/version, a missing or unknown field, a value out of range, or stages that do not cover the model's blocks
each raise one `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dsm_tune.errors import DSMTuneError

FORMAT_NAME = "dsm-tune/config"
# Version 2 added the per-stage `operator`; a config whose every stage merges is still written as version 1, so a
# runtime that reads only version 1 keeps applying it, and refuses (rather than misreads) one that prunes.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# How a stage reduces its tokens (docs/design.md section 2):
#   merge         bipartite soft matching, merged tokens averaged by size (ToMe's operator; the default)
#   merge_norm    the same pairs, the average rescaled to the size-weighted mean norm of what it merges (averaging
#                 tokens that point apart shrinks the norm, which shifts the next LayerNorm's statistics)
#   merge_energy  the same matching, but the A tokens merged first are the most redundant ones (highest mean
#                 similarity to their window), not the ones with the closest partner: informative tokens are kept
#   prune         the least-attended tokens of each window are dropped (attention from the prefix tokens); no
#                 averaging, so cheaper, and the tokens left stay exactly the model's own
OPERATORS = ("merge", "merge_norm", "merge_energy", "prune")
DEFAULT_OPERATOR = "merge"
MAX_RATIO = 0.5  # bipartite matching pairs each merged token of one half with one of the other half
MAX_HIERARCHY_DEPTH = 6


class ConfigError(DSMTuneError, ValueError):
    """The config (or its JSON document) is malformed or out of range."""


class ModelMismatchError(DSMTuneError, ValueError):
    """The config does not fit the model, or the model cannot be patched."""


def _require_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _require_pair(value: Any, name: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{name} must be a pair of integers, got {value!r}")
    return (_require_int(value[0], f"{name}[0]", 1), _require_int(value[1], f"{name}[1]", 1))


def _reject_unknown_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(map(repr, unknown))} in {where}; expected {sorted(allowed)}")


def _require_keys(data: Mapping[str, Any], required: Sequence[str], where: str) -> None:
    for key in required:
        if key not in data:
            raise ConfigError(f"missing field {key!r} in {where}")


@dataclass(frozen=True)
class Stage:
    """Consecutive blocks that reduce the same way: a fraction `ratio` of the tokens, or a fixed count `r`, by
    `operator` (OPERATORS)."""

    blocks: int
    ratio: float | None = None
    r: int | None = None
    operator: str = DEFAULT_OPERATOR

    def __post_init__(self) -> None:
        if isinstance(self.ratio, int) and not isinstance(self.ratio, bool):
            object.__setattr__(self, "ratio", float(self.ratio))

    def validate(self, where: str = "stage") -> None:
        _require_int(self.blocks, f"{where}.blocks", 1)
        if (self.ratio is None) == (self.r is None):
            raise ConfigError(f"{where} needs exactly one of 'ratio' or 'r'")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, float) or math.isnan(self.ratio):
                raise ConfigError(f"{where}.ratio must be a number, got {self.ratio!r}")
            if not 0.0 <= self.ratio <= MAX_RATIO:
                raise ConfigError(f"{where}.ratio {self.ratio} is outside [0, {MAX_RATIO}]")
        if self.r is not None:
            _require_int(self.r, f"{where}.r", 0)
        if self.operator not in OPERATORS:
            raise ConfigError(f"{where}.operator {self.operator!r} is not one of {', '.join(OPERATORS)}")

    @property
    def merges(self) -> bool:
        return bool(self.ratio) or bool(self.r)

    def to_dict(self) -> dict[str, Any]:
        amount = {"ratio": self.ratio} if self.ratio is not None else {"r": self.r}
        # The default operator is left out, so a merge stage's text (and every key built from it) is as before.
        operator = {"operator": self.operator} if self.operator != DEFAULT_OPERATOR else {}
        return {"blocks": self.blocks, **amount, **operator}

    @classmethod
    def from_dict(cls, data: Any, where: str = "stage", version: int = FORMAT_VERSION) -> "Stage":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object like {{'blocks': 4, 'ratio': 0.1}}, got {data!r}")
        if "operator" in data and version < 2:
            raise ConfigError(f"unknown field(s) 'operator' in {where}: per-stage operators need config version 2, "
                              f"this document is version {version}")
        _reject_unknown_keys(data, {"blocks", "ratio", "r", "operator"}, where)
        _require_keys(data, ["blocks"], where)
        stage = cls(blocks=data["blocks"], ratio=data.get("ratio"), r=data.get("r"),
                    operator=data.get("operator", DEFAULT_OPERATOR))
        stage.validate(where)
        return stage


@dataclass(frozen=True)
class ModelFingerprint:
    """What a config was tuned for; a model that differs in any field is refused."""

    name: str
    num_blocks: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    img_size: tuple[int, int]
    embed_dim: int

    @classmethod
    def from_model(cls, model: Any) -> "ModelFingerprint":
        for attribute in ("blocks", "patch_embed", "num_prefix_tokens", "embed_dim"):
            if not hasattr(model, attribute):
                raise ModelMismatchError(
                    f"{type(model).__name__} is not a timm VisionTransformer (it has no {attribute!r})")
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
        name = pretrained_cfg.get("architecture") or type(model).__name__
        return cls(
            name=str(name),
            num_blocks=len(model.blocks),
            grid=tuple(int(v) for v in model.patch_embed.grid_size),
            num_prefix_tokens=int(model.num_prefix_tokens),
            img_size=tuple(int(v) for v in model.patch_embed.img_size),
            embed_dim=int(model.embed_dim),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_blocks": self.num_blocks,
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "img_size": list(self.img_size),
            "embed_dim": self.embed_dim,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ModelFingerprint":
        if not isinstance(data, Mapping):
            raise ConfigError(f"'model' must be an object, got {data!r}")
        allowed = {"name", "num_blocks", "grid", "num_prefix_tokens", "img_size", "embed_dim"}
        _reject_unknown_keys(data, allowed, "'model'")
        _require_keys(data, sorted(allowed), "'model'")
        if not isinstance(data["name"], str) or not data["name"]:
            raise ConfigError(f"model.name must be a non-empty string, got {data['name']!r}")
        return cls(
            name=data["name"],
            num_blocks=_require_int(data["num_blocks"], "model.num_blocks", 1),
            grid=_require_pair(data["grid"], "model.grid"),
            num_prefix_tokens=_require_int(data["num_prefix_tokens"], "model.num_prefix_tokens", 0),
            img_size=_require_pair(data["img_size"], "model.img_size"),
            embed_dim=_require_int(data["embed_dim"], "model.embed_dim", 1),
        )

    def differences(self, other: "ModelFingerprint") -> list[str]:
        return [
            f"{f.name} {getattr(self, f.name)!r} (config) vs {getattr(other, f.name)!r} (model)"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def max_hierarchy_depth(grid: tuple[int, int]) -> int:
    """Deepest hierarchy whose finest windows still tile the grid evenly with at least 2x2 tokens each."""
    depth = 0
    while depth < MAX_HIERARCHY_DEPTH:
        side = 2 ** (depth + 1)
        if any(n % side or n // side < 2 for n in grid):
            break
        depth += 1
    return depth


@dataclass(frozen=True)
class DSMConfig:
    """Delayed Spatial Merging settings (docs/design.md section 2), optionally bound to the model they fit."""

    start_layer: int
    hierarchy_depth: int
    stages: tuple[Stage, ...]
    proportional_attention: bool = True
    model: ModelFingerprint | None = None
    target: Mapping[str, Any] | None = field(default=None, compare=False)
    metrics: Mapping[str, Any] | None = field(default=None, compare=False)
    provenance: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        self.validate()

    # construction --------------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: Any, *, start_layer: int, hierarchy_depth: int,
                  stages: Sequence[Stage | Mapping[str, Any]], proportional_attention: bool = True) -> "DSMConfig":
        parsed = tuple(s if isinstance(s, Stage) else Stage.from_dict(s, f"stages[{i}]")
                       for i, s in enumerate(stages))
        return cls(start_layer=start_layer, hierarchy_depth=hierarchy_depth, stages=parsed,
                   proportional_attention=proportional_attention, model=ModelFingerprint.from_model(model))

    @classmethod
    def dense(cls, model: Any) -> "DSMConfig":
        """Every ratio 0: the patched model computes exactly what the original does."""
        fingerprint = ModelFingerprint.from_model(model)
        return cls(start_layer=0, hierarchy_depth=0, stages=(Stage(fingerprint.num_blocks, ratio=0.0),),
                   proportional_attention=False, model=fingerprint)

    @classmethod
    def tome(cls, model: Any, r: int, proportional_attention: bool = True) -> "DSMConfig":
        """ToMe's schedule: merge `r` tokens in every block, globally, from the first block on."""
        fingerprint = ModelFingerprint.from_model(model)
        return cls(start_layer=0, hierarchy_depth=0, stages=(Stage(fingerprint.num_blocks, r=r),),
                   proportional_attention=proportional_attention, model=fingerprint)

    def replace(self, **changes: Any) -> "DSMConfig":
        return dataclasses.replace(self, **changes)

    # validation ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        _require_int(self.start_layer, "start_layer", 0)
        _require_int(self.hierarchy_depth, "hierarchy_depth", 0)
        if self.hierarchy_depth > MAX_HIERARCHY_DEPTH:
            raise ConfigError(f"hierarchy_depth {self.hierarchy_depth} exceeds the maximum {MAX_HIERARCHY_DEPTH}")
        if not isinstance(self.proportional_attention, bool):
            raise ConfigError(f"proportional_attention must be true or false, got {self.proportional_attention!r}")
        if not isinstance(self.stages, tuple) or not all(isinstance(s, Stage) for s in self.stages):
            raise ConfigError("stages must be a list of Stage objects")
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages[{i}]")
        for name in ("target", "metrics", "provenance"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be an object, got {type(value).__name__}")
        if self.model is None:
            if not self.stages:
                raise ConfigError("stages is empty: give at least one stage")
            return
        num_blocks = self.model.num_blocks
        if self.start_layer > num_blocks:
            raise ConfigError(f"start_layer {self.start_layer} is past the model's {num_blocks} blocks")
        covered = sum(s.blocks for s in self.stages)
        if covered != num_blocks - self.start_layer:
            raise ConfigError(
                f"stages cover {covered} blocks but blocks {self.start_layer}..{num_blocks - 1} after start_layer "
                f"are {num_blocks - self.start_layer}")
        deepest = max_hierarchy_depth(self.model.grid)
        if self.hierarchy_depth > deepest:
            h, w = self.model.grid
            raise ConfigError(
                f"hierarchy_depth {self.hierarchy_depth} is too deep for the {h}x{w} patch grid: the grid must split "
                f"evenly into {2 ** self.hierarchy_depth}x{2 ** self.hierarchy_depth} windows of at least 2x2 tokens "
                f"(at most depth {deepest})")

    # serialisation -------------------------------------------------------------------------------------------
    def merge_dict(self) -> dict[str, Any]:
        return {
            "start_layer": self.start_layer,
            "hierarchy_depth": self.hierarchy_depth,
            "stages": [s.to_dict() for s in self.stages],
            "proportional_attention": self.proportional_attention,
        }

    @property
    def format_version(self) -> int:
        """The oldest format that holds this config: 1 unless a stage uses another operator than merge."""
        return 1 if all(stage.operator == DEFAULT_OPERATOR for stage in self.stages) else FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"format": FORMAT_NAME, "version": self.format_version}
        if self.model is not None:
            document["model"] = self.model.to_dict()
        document["merge"] = self.merge_dict()
        for name in ("target", "metrics", "provenance"):
            value = getattr(self, name)
            if value is not None:
                document[name] = dict(value)
        return document

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Any, require_model: bool = False) -> "DSMConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a DSM config must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise ConfigError(f"not a dsm-tune config: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ConfigError(f"unsupported config version {version!r}: this dsm-tune reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
        _reject_unknown_keys(data, {"format", "version", "model", "merge", "target", "metrics", "provenance"},
                             "the config")
        if require_model:
            _require_keys(data, ["model"], "the config")
        _require_keys(data, ["merge"], "the config")
        merge = data["merge"]
        if not isinstance(merge, Mapping):
            raise ConfigError(f"'merge' must be an object, got {merge!r}")
        merge_keys = ["start_layer", "hierarchy_depth", "stages", "proportional_attention"]
        _reject_unknown_keys(merge, set(merge_keys), "'merge'")
        _require_keys(merge, merge_keys, "'merge'")
        if not isinstance(merge["stages"], list):
            raise ConfigError(f"merge.stages must be a list, got {merge['stages']!r}")
        stages = tuple(Stage.from_dict(s, f"merge.stages[{i}]", version) for i, s in enumerate(merge["stages"]))
        model = ModelFingerprint.from_dict(data["model"]) if "model" in data else None
        return cls(
            start_layer=merge["start_layer"],
            hierarchy_depth=merge["hierarchy_depth"],
            stages=stages,
            proportional_attention=merge["proportional_attention"],
            model=model,
            target=data.get("target"),
            metrics=data.get("metrics"),
            provenance=data.get("provenance"),
        )

    # identity for search and logging -------------------------------------------------------------------------
    def key(self) -> str:
        """Canonical text of the merge settings alone: equal keys compute the same merged model."""
        return json.dumps(self.merge_dict(), sort_keys=True, separators=(",", ":"))

    def merge_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "start_layer": self.start_layer,
            "hierarchy_depth": self.hierarchy_depth,
            "num_stages": len(self.stages),
            "proportional_attention": self.proportional_attention,
        }
        for i, stage in enumerate(self.stages):
            params[f"stage{i}_blocks"] = stage.blocks
            if stage.ratio is not None:
                params[f"stage{i}_ratio"] = stage.ratio
            else:
                params[f"stage{i}_r"] = stage.r
            if stage.operator != DEFAULT_OPERATOR:
                params[f"stage{i}_operator"] = stage.operator
        return params


def load_config(source: str | Path) -> DSMConfig:
    """Read a frozen config from a path, or from JSON text; the model fingerprint is required."""
    text: str
    origin: str
    if isinstance(source, Path) or not str(source).lstrip().startswith("{"):
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
    else:
        text, origin = str(source), "the config text"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    try:
        return DSMConfig.from_dict(data, require_model=True)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
