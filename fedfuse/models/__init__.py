"""Model loading: the embedded default classifier (all-MiniLM-L6-v2), the embedded chat LLM (SmolLM2-135M-Instruct),
local folders, hub ids, causal LMs."""

from fedfuse.defaults import default_cache_dir
from fedfuse.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODEL_PACKAGE,
    EMBEDDED_MODEL_PIP,
    SMOLLM2_MODEL,
    ModelLoadError,
    check_model_folder,
    embedded_model_dir,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    model_skeleton,
    resolve_model_source,
)
from fedfuse.models.smollm2 import (
    SMOLLM2_INSTALL,
    is_prepared,
    prepare_smollm2,
    smollm2_dir,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODEL_PACKAGE",
    "EMBEDDED_MODEL_PIP",
    "SMOLLM2_INSTALL",
    "SMOLLM2_MODEL",
    "ModelLoadError",
    "check_model_folder",
    "default_cache_dir",
    "embedded_model_dir",
    "is_prepared",
    "load_causal_lm",
    "load_classifier",
    "load_tokenizer",
    "model_skeleton",
    "prepare_smollm2",
    "resolve_model_source",
    "smollm2_dir",
]
