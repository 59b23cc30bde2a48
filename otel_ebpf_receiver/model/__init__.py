"""The state model at run time: the file contract (``contract``), loading, validating and scoring a file
(``runtime``), and serving the newest valid file of a directory with hot swap (``watch``)."""

from .contract import (DEFAULT_MAX_BYTES, INPUT_NAME, METADATA_ALGORITHM, METADATA_DISTANCE, METADATA_FEATURES,
                       METADATA_FORMAT, METADATA_PERCENTILE, METADATA_STATES, METADATA_THRESHOLDS, METADATA_TRAINING,
                       METADATA_UNKNOWN_ABOVE, METADATA_VERSION, MODEL_FORMAT, OUTPUT_DEVIATION, OUTPUT_DISTANCES,
                       OUTPUT_LABEL, OUTPUT_NAMES, REQUIRED_METADATA, TOP_FEATURES, UNKNOWN_STATE, ModelError)
from .runtime import StateModel, Verdict, load_model, session_options

__all__ = [
    "DEFAULT_MAX_BYTES", "INPUT_NAME", "METADATA_ALGORITHM", "METADATA_DISTANCE", "METADATA_FEATURES",
    "METADATA_FORMAT", "METADATA_PERCENTILE", "METADATA_STATES", "METADATA_THRESHOLDS", "METADATA_TRAINING",
    "METADATA_UNKNOWN_ABOVE", "METADATA_VERSION", "MODEL_FORMAT", "OUTPUT_DEVIATION", "OUTPUT_DISTANCES",
    "OUTPUT_LABEL", "OUTPUT_NAMES", "REQUIRED_METADATA", "TOP_FEATURES", "UNKNOWN_STATE", "ModelError",
    "StateModel", "Verdict", "load_model", "session_options",
]
