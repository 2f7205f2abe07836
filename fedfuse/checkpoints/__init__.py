"""Checkpoint I/O: read safetensors files / HF model folders tensor by tensor, write them as a stream.

>>> from fedfuse.checkpoints import open_checkpoint
>>> # with open_checkpoint("path/to/model") as ckpt: ckpt.names, ckpt.info(name), ckpt.get(name)
"""

from fedfuse.checkpoints.reader import (
    DTYPE_CODES,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    CheckpointReader,
    CheckpointReadError,
    TensorInfo,
    is_weight_file,
    open_checkpoint,
)
from fedfuse.checkpoints.writer import (
    CheckpointWriteError,
    SafetensorsStreamWriter,
    ShardedWriter,
    TensorSpec,
    atomic_output,
    build_header,
    check_target,
    parse_size,
    plan_shards,
    recover_interrupted_writes,
    shard_name,
    tensor_bytes,
)

__all__ = [
    "DTYPE_CODES",
    "INDEX_FILE",
    "SAFETENSORS_DTYPES",
    "SINGLE_FILE",
    "CheckpointReadError",
    "CheckpointReader",
    "CheckpointWriteError",
    "SafetensorsStreamWriter",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "atomic_output",
    "build_header",
    "check_target",
    "is_weight_file",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "recover_interrupted_writes",
    "shard_name",
    "tensor_bytes",
]
