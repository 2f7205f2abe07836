"""Export a run's global model: a Hugging Face model folder, or (LoRA runs) a PEFT LoRA adapter.

>>> from fedfuse.export import export_model, export_adapter
>>> # export_model("runs/fedfuse", "exported/model"); export_adapter("runs/fedfuse", "exported/adapter", rank=16)
"""

from fedfuse.export.adapter import export_adapter
from fedfuse.export.model import export_model
from fedfuse.export.run import PROVENANCE_FILE, ExportError, ExportResult, open_run

__all__ = ["PROVENANCE_FILE", "ExportError", "ExportResult", "export_adapter", "export_model", "open_run"]
