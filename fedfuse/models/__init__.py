"""Model loading: the embedded default classifier (all-MiniLM-L6-v2), local folders, hub ids, causal LMs."""

from fedfuse.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODEL_PACKAGE,
    EMBEDDED_MODEL_PIP,
    ModelLoadError,
    check_model_folder,
    embedded_model_dir,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    resolve_model_source,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODEL_PACKAGE",
    "EMBEDDED_MODEL_PIP",
    "ModelLoadError",
    "check_model_folder",
    "embedded_model_dir",
    "load_causal_lm",
    "load_classifier",
    "load_tokenizer",
    "resolve_model_source",
]
