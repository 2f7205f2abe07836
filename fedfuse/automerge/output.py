"""Writing a coefficient merge as a model folder: base + change per tensor, streamed in the base's dtypes."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from fedfuse import __version__
from fedfuse.checkpoints import ShardedWriter, TensorSpec, is_weight_file, open_checkpoint
from fedfuse.offline.errors import MergeInputError


def write_merged_tensors(base: Path, changes: Mapping[str, torch.Tensor], folder: Path, method: str) -> None:
    """Stream base + change for every tensor of the local ``base`` folder into ``folder``, then copy its other files.

    Tensors keep the base's dtypes (the sum is taken in fp32); ``folder`` is the caller's temporary folder of
    an ``atomic_output``, so a failure leaves nothing behind. ``method`` is recorded in the metadata.
    """
    with open_checkpoint(base) as reader:
        missing = [name for name in changes if name not in reader]
        if missing:
            raise MergeInputError(f"the base {base} lacks the tensor {missing[0]!r} that the candidates change")
        specs = [TensorSpec(name, reader.info(name).shape, reader.info(name).dtype) for name in reader.names]
        metadata = {"format": "pt", "fedfuse_method": method, "fedfuse_version": __version__}
        writer = ShardedWriter(folder, specs, metadata=metadata)
        for name in reader.names:
            tensor = reader.get(name)
            if name in changes:
                tensor = (tensor.float() + changes[name].reshape(tensor.shape).float()).to(tensor.dtype)
            writer.write(name, tensor.contiguous())
        writer.close()
    for item in sorted(Path(base).iterdir()):
        if item.is_file() and not is_weight_file(item):
            shutil.copy2(item, folder / item.name)
