"""mmdx: a multimodal diagnosis engine (medical images + clinical text + tabular features).

Data flow: records → preprocess (image/text/tabular) → encoders → fusion → head → predictions → explanations.
"""
from .api import DiagnosisModel
from .comparison import compare
from .config import Config, load_config
from .errors import RecordError, UserError
from .records import Records, load_records

__version__ = "0.1.0"
__all__ = ["DiagnosisModel", "compare", "Config", "load_config", "load_records", "Records", "UserError", "RecordError"]
