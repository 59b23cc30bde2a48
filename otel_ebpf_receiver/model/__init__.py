"""The state model at run time: the file contract (``contract``), static checks of a file (``checks``), its first
run under time and memory limits (``sandbox``), loading and scoring (``runtime``), and serving the newest valid
file of a directory with hot swap (``watch``)."""

from .contract import (DEFAULT_MAX_BYTES, INPUT_NAME, MAX_RUN_SECONDS, METADATA_ALGORITHM, METADATA_ATTACK_STATES,
                       METADATA_DISTANCE, METADATA_FEATURE_BOUNDS, METADATA_FEATURES, METADATA_FORMAT,
                       METADATA_PERCENTILE, METADATA_STATES, METADATA_THRESHOLDS, METADATA_TRAINING,
                       METADATA_UNKNOWN_ABOVE, METADATA_VERSION,
                       MODEL_FORMAT, NORMAL_STATE, OUTPUT_DEVIATION, OUTPUT_DISTANCES, OUTPUT_LABEL,
                       OUTPUT_NAMES, OUTPUT_NORMAL_DEVIATION, REQUIRED_METADATA, SANDBOX_MEMORY_BYTES,
                       SANDBOX_SECONDS, TOP_FEATURES, UNKNOWN_STATE, ModelError)
from .runtime import StateModel, Verdict, load_model, probe_vectors, session_options

__all__ = [
    "DEFAULT_MAX_BYTES", "INPUT_NAME", "MAX_RUN_SECONDS", "METADATA_ALGORITHM", "METADATA_ATTACK_STATES",
    "METADATA_DISTANCE", "METADATA_FEATURE_BOUNDS", "METADATA_FEATURES", "METADATA_FORMAT", "METADATA_PERCENTILE",
    "METADATA_STATES",
    "METADATA_THRESHOLDS", "METADATA_TRAINING", "METADATA_UNKNOWN_ABOVE", "METADATA_VERSION", "MODEL_FORMAT",
    "NORMAL_STATE", "OUTPUT_DEVIATION", "OUTPUT_DISTANCES", "OUTPUT_LABEL", "OUTPUT_NAMES", "OUTPUT_NORMAL_DEVIATION",
    "REQUIRED_METADATA",
    "SANDBOX_MEMORY_BYTES", "SANDBOX_SECONDS", "TOP_FEATURES", "UNKNOWN_STATE", "ModelError", "StateModel",
    "Verdict", "load_model", "probe_vectors", "session_options",
]
