"""Pure tensor algebra: task vectors, sparse tensors, sparsifiers (and their registry), seeds. No Flower, no I/O."""

from fedfuse.algebra.lora import (
    Refactored,
    factor_names,
    factors_to_deltas,
    lora_delta,
    lora_modules,
    naive_factor_average,
    svd_refactor,
)
from fedfuse.algebra.names import name_mismatch
from fedfuse.algebra.params import Param
from fedfuse.algebra.seeds import derive_seed
from fedfuse.algebra.sparse import SparseTensor, Update, UpdateTensor, to_dense
from fedfuse.algebra.sparsifiers import (
    RESCALES,
    SparsifierSpec,
    available_sparsifiers,
    register_sparsifier,
    sparsifier_spec,
)
from fedfuse.algebra.sparsify import (
    Sparsifier,
    dare_drop,
    dare_indices,
    dare_mask,
    dare_seed_fn,
    global_trim,
    sparsify_update,
    ties_trim,
    trim_count,
)
from fedfuse.algebra.task_vector import apply_task_vector, task_vector

__all__ = [
    "RESCALES",
    "Param",
    "Refactored",
    "SparseTensor",
    "Sparsifier",
    "SparsifierSpec",
    "Update",
    "UpdateTensor",
    "apply_task_vector",
    "available_sparsifiers",
    "dare_drop",
    "dare_indices",
    "dare_mask",
    "dare_seed_fn",
    "derive_seed",
    "factor_names",
    "factors_to_deltas",
    "global_trim",
    "lora_delta",
    "lora_modules",
    "naive_factor_average",
    "name_mismatch",
    "register_sparsifier",
    "sparsifier_spec",
    "sparsify_update",
    "svd_refactor",
    "task_vector",
    "ties_trim",
    "to_dense",
    "trim_count",
]
