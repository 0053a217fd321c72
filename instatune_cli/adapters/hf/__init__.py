"""What the transformers families share; not a family itself (`adapters/__init__.py` skips this package).

`base.py`: `HFAdapter`, the base of every transformers family (Auto loading with the task's classes, configs,
extraction); `extract.py`: extraction to the family's stock class or our per-layer class; `fusion.py`: ONNX
Runtime's transformer fusions of the text encoders' exported graphs.
"""

#: transformers model types that are another's architecture under another name: XLM-R and CamemBERT are RoBERTa.
#: The one alias table (a family's `aliases`; `adapters.model_family` reads it).
ALIASES = {"xlm-roberta": "roberta", "camembert": "roberta"}
