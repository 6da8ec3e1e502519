"""nerofy: turn a PyTorch model into a balanced network trained by Nero.

Public API: :func:`wrap`, :func:`plan`, :func:`bake`, :class:`Nero`, :class:`Plan`,
:class:`NeuronLayout`, :func:`balance`.
"""
from .balanced import Balanced, balance, is_balanced
from .layout import NeuronLayout
from .optim import Nero

__version__ = "0.1.0"

__all__ = ["Nero", "NeuronLayout", "Balanced", "balance", "is_balanced", "__version__"]
