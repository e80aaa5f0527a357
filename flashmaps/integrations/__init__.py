"""Integrations with other libraries; each submodule imports its library lazily.

``flashmaps.integrations.transformers``: ``register()`` adds ``attn_implementation="fmaps_softmax"``,
``"fmaps_taylor"``, ``"fmaps_entmax15"``, ``"fmaps_topk"`` (and names of your own) to Hugging Face
transformers.
"""

from importlib import import_module as _import_module


def __getattr__(name):  # flashmaps.integrations.transformers is imported on first use
    if name == "transformers":
        return _import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flashmaps.integrations' has no attribute {name!r}")
