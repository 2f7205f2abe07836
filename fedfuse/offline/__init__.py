"""The offline merge engine (mergekit-like): merge finished checkpoints tensor by tensor with any strategy.

Plan → execute → write: :mod:`.plan` checks the options and builds the strategy from its
declarations; :mod:`.sources` opens the inputs and checks them from their headers (fine-tuned
models, or partial states); :mod:`.execute` runs the one per-tensor loop (memory: one tensor and
its statistics); :mod:`.sinks` write a model folder or a partial state, atomically.

Tiers: ``merge_models(..., partial_out=FILE)`` writes a group's partial state in the one format
tier gateways send (``fedfuse.wire.encode_partial``); :func:`combine_partials` folds such files —
or a gateway's payload saved to a file — into the model a flat merge gives.

PEFT LoRA adapters: :func:`merge_adapters` merges them exactly in ΔW space (:mod:`.adapters`).

Diagnostics: :func:`diagnose_models` / :func:`diagnose_adapters` (``fedfuse merge … --diagnose``) read the
inputs as a merge would and report their mergeability (norms, sketched cosines, sign conflicts, outliers)
without writing a model (:mod:`.diagnose`).

Each mode's options are one validated request (:mod:`.request`: :class:`ModelsRequest`,
:class:`AdaptersRequest`, :class:`CombineRequest`, :class:`RecipeRequest`); the functions take one,
or its fields as keywords.

>>> from fedfuse.offline import merge_models, combine_partials
>>> # merge_models("base", ["ft-a", "ft-b"], method="ties", density=0.2, out="merged")
"""

from fedfuse.offline.adapter_merge import AdapterMergeResult, merge_adapters
from fedfuse.offline.api import combine_partials, merge_models
from fedfuse.offline.diagnose import DiagnosisResult, diagnose_adapters, diagnose_models
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.execute import Progress
from fedfuse.offline.request import AdaptersRequest, CombineRequest, ModelsRequest, RecipeRequest, RequestError
from fedfuse.offline.sinks import MergeResult

__all__ = [
    "AdapterMergeResult",
    "AdaptersRequest",
    "CombineRequest",
    "DiagnosisResult",
    "MergeInputError",
    "MergeResult",
    "ModelsRequest",
    "Progress",
    "RecipeRequest",
    "RequestError",
    "combine_partials",
    "diagnose_adapters",
    "diagnose_models",
    "merge_adapters",
    "merge_models",
]
