"""Integrations with other libraries; each submodule imports its library lazily.

``flashmaps.integrations.transformers``: ``register()`` adds ``attn_implementation="fmaps_softmax"``,
``"fmaps_taylor"``, ``"fmaps_entmax15"``, ``"fmaps_topk"`` (and names of your own) to Hugging Face
transformers.
"""
