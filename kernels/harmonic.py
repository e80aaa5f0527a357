"""Harmonic hooks: softmax's (``kernels.softmax``) over the distance form of the score.

The score tile is ``-(n/2) ln(max(scale ||q - k||^2, tiny))`` (``tiles.log_distance``, selected by
``Static.DISTANCE`` from ``Normalizer.score == "distance"``; the launcher passes scale and -(n/2) in
``ScoreScale.dist_scale`` / ``dist_mult``), in log2 units as softmax's; the backward kernels chain dS through
the log-distance. Nothing here differs from softmax but the name.
"""

from .softmax import HOOKS as _SOFTMAX

HOOKS = _SOFTMAX._replace(name="harmonic")
