"""Client-side error feedback: what the sparsifier dropped is carried into the next round.

Each round the client sends C(τ + r) and keeps r' = (τ + r) − C(τ + r), so after R rounds
Σ sent = Σ τ − r_R exactly: the sum of what the server received tracks the sum of the true updates
up to the last residual, which stays bounded when the compressor C is contractive
(E‖x − C(x)‖² ≤ (1 − δ)‖x‖²). A TIES trim is (δ = ⌊d·n⌋/n), and so is a DARE drop *without* its
1/d rescale (δ = d). The rescaled DARE drop is unbiased but not contractive for d ≤ 0.5: there
E‖x − C(x)‖² = (1 − d)/d·‖x‖² ≥ ‖x‖², so the residual's variance grows every round (exponentially
for d < 0.5). Error feedback therefore sends DARE's kept entries unrescaled by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedfuse.algebra import SparseTensor, Sparsifier, dare_drop, name_mismatch, sparsify_update


def _untransmitted(corrected: torch.Tensor, sent: torch.Tensor | SparseTensor) -> torch.Tensor:
    """corrected − sent as a new dense fp32 tensor, without densifying a sparse ``sent``."""
    if isinstance(sent, SparseTensor):
        residual = corrected.clone(memory_format=torch.contiguous_format)
        flat = residual.view(-1)
        flat.index_add_(0, sent.indices.to(flat.device), sent.values.to(flat), alpha=-1.0)
        return residual
    return corrected - sent.to(corrected)


class ErrorFeedback:
    """Keeps one client's residual between rounds and folds it into the next task vector.

    Parameters
    ----------
    sparsifier : Sparsifier
        How each round's corrected task vector τ + r is shrunk before it is sent.
    dare_rescale : bool
        For a DARE sparsifier, whether kept entries are rescaled by 1/density (plain DARE).
        Default False: unrescaled drops keep the residual bounded for every density. Rescaling
        is accepted only for density > 0.5, where the residual is still bounded.

    The residual is a plain ``{name: fp32 tensor}`` mapping (see :meth:`state_dict`), so a
    Flower client can keep it in its ``Context.state`` between rounds.
    """

    def __init__(self, sparsifier: Sparsifier, *, dare_rescale: bool = False) -> None:
        if not isinstance(sparsifier, Sparsifier):
            raise TypeError(f"ErrorFeedback needs a fedfuse.algebra.Sparsifier, got {type(sparsifier).__name__}")
        if dare_rescale and sparsifier.kind == "dare" and sparsifier.density <= 0.5:
            raise ValueError(
                f"error feedback with rescaled DARE at density {sparsifier.density} does not converge: "
                "each round multiplies the residual's variance by (1 - density)/density >= 1; "
                "use dare_rescale=False (the default) or a density above 0.5"
            )
        self.sparsifier = sparsifier
        self.dare_rescale = dare_rescale
        self._residual: dict[str, torch.Tensor] = {}

    @property
    def residual(self) -> dict[str, torch.Tensor]:
        """What was not yet transmitted, per tensor (fp32, dense); empty before the first round."""
        return dict(self._residual)

    def compress(
        self, tau: Mapping[str, torch.Tensor], seed_for: Callable[[str], int] | None = None
    ) -> dict[str, torch.Tensor | SparseTensor]:
        """Sparsify τ + residual, keep what was dropped as the new residual, return what to send.

        ``seed_for(name)`` gives each tensor's DARE seed (build it with
        :func:`fedfuse.algebra.dare_seed_fn`). Names and shapes must match earlier rounds; on any
        error the stored residual is left unchanged.
        """
        corrected = self._corrected(tau)
        sent = self._sparsify(corrected, seed_for)
        self._residual = {name: _untransmitted(value, sent[name]) for name, value in corrected.items()}
        return sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the residual as plain tensors keyed by parameter name."""
        return {name: tensor.detach().clone() for name, tensor in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a residual written by :meth:`state_dict` (stored as fp32 copies)."""
        loaded: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"residual {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise ValueError(f"residual {name!r}: expected a floating tensor, got {tensor.dtype}")
            loaded[name] = tensor.detach().to(torch.float32).clone()
        self._residual = loaded

    def reset(self) -> None:
        """Forget the residual (for example when the base model changes shape)."""
        self._residual = {}

    def _corrected(self, tau: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """τ + residual in fp32, after checking names, shapes and dtypes against earlier rounds."""
        if self._residual:
            problem = name_mismatch(self._residual, tau, missing="missing this round", extra="new this round")
            if problem:
                raise ValueError(f"task vector tensors changed since the last round ({problem}); call reset() first")
        corrected: dict[str, torch.Tensor] = {}
        for name, tensor in tau.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"tensor {name!r}: task vectors must be floating tensors, got {kind}")
            value = tensor.detach().to(torch.float32)
            residual = self._residual.get(name)
            if residual is not None:
                if residual.shape != tensor.shape:
                    raise ValueError(
                        f"tensor {name!r}: shape {tuple(tensor.shape)} but the residual from earlier rounds "
                        f"has {tuple(residual.shape)}; call reset() first"
                    )
                value = value + residual.to(value.device)
            corrected[name] = value
        return corrected

    def _sparsify(
        self, corrected: dict[str, torch.Tensor], seed_for: Callable[[str], int] | None
    ) -> dict[str, torch.Tensor | SparseTensor]:
        s = self.sparsifier
        if s.kind != "dare" or self.dare_rescale:
            return sparsify_update(corrected, s, seed_for)
        if seed_for is None:
            raise ValueError("DARE needs seed_for(name) -> seed; build one with dare_seed_fn(...)")
        return {name: dare_drop(t, s.density, seed_for(name), rescale=False) for name, t in corrected.items()}


def shrink_update(
    tau: Mapping[str, torch.Tensor],
    sparsifier: Sparsifier,
    seed_for: Callable[[str], int],
    feedback: ErrorFeedback | None = None,
) -> dict[str, torch.Tensor | SparseTensor]:
    """What a client sends for ``tau``: sparsified through ``feedback`` when given (and not dense), else directly."""
    if feedback is not None and sparsifier.kind != "none":
        return feedback.compress(tau, seed_for)
    return sparsify_update(tau, sparsifier, seed_for)
