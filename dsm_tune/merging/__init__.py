"""Runtime DSM merger for timm ViTs: what deployment teams import (torch + timm only).

    from dsm_tune.merging import apply_dsm, load_config
    apply_dsm(model, load_config("dsm.json"))
"""

from .config import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_RATIO,
    ConfigError,
    DSMConfig,
    ModelFingerprint,
    ModelMismatchError,
    Stage,
    load_config,
    max_hierarchy_depth,
)
from .export import ONNX_CONFIG_KEY, OnnxExportError, export_onnx, read_onnx_config
from .patch import applied_config, apply_dsm, check_fits, is_patched, remove_dsm
from .schedule import BlockPlan, block_plan, merge_report, token_schedule

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MAX_RATIO", "ONNX_CONFIG_KEY", "BlockPlan", "ConfigError", "DSMConfig",
    "ModelFingerprint", "ModelMismatchError", "OnnxExportError", "Stage", "applied_config", "apply_dsm",
    "block_plan", "check_fits", "export_onnx", "is_patched", "load_config", "max_hierarchy_depth", "merge_report",
    "read_onnx_config", "remove_dsm", "token_schedule",
]
