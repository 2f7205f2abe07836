"""A fingerprint of tensors: of a round's weights (FedMerge apps), of a broadcast delta's arrays (model versions)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

PREFIX = "sha256:"


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over every tensor's name, dtype, shape and bytes, in sorted-name order.

    Each tensor is framed by a JSON line ``[name, dtype, shape, nbytes]`` so names and boundaries
    are unambiguous. Bytes are streamed into the hash from a zero-copy view of each tensor (only a
    non-contiguous or non-CPU tensor is copied, one at a time), never from a copy of the model.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"fingerprint needs a mapping of name → tensor, got {type(state_dict).__name__}")
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"fingerprint: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        frame = [name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), nbytes]
        digest.update(json.dumps(frame).encode("utf-8") + b"\n")
        if nbytes:
            digest.update(flat.view(torch.uint8).numpy().data)
    return PREFIX + digest.hexdigest()
