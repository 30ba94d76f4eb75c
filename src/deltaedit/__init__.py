"""deltaedit: sequential knowledge editing of causal language models (DeltaEdit, AlphaEdit, ...)."""

from .applied import AppliedEdit, EditResult
from .editor import Editor
from .edits_file import apply_edits
from .ledger import BaseModelMismatchError, Ledger, LedgerEntry, LedgerError
from .methods import METHODS, AlphaEditConfig, DeltaEditConfig, MethodConfig
from .models import ModelLoadError, ModelStructureError, find_parts, load_model
from .requests import EditError, EditFailure, EditRequest, RequestError

__version__ = "0.1.0"
__all__ = [
    "Editor",
    "EditResult",
    "AppliedEdit",
    "EditRequest",
    "RequestError",
    "EditError",
    "EditFailure",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "BaseModelMismatchError",
    "apply_edits",
    "load_model",
    "find_parts",
    "ModelLoadError",
    "ModelStructureError",
    "METHODS",
    "MethodConfig",
    "AlphaEditConfig",
    "DeltaEditConfig",
]
