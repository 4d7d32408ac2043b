"""fastrnn: fast CPU recurrent layers (RNN, LSTM) for NumPy, with torch.nn's interface.

The kernels are compiled for several instruction sets and the best one this CPU supports is
chosen at import; ``FASTRNN_ISA=scalar|avx2|avx512|neon`` forces one.
"""

from __future__ import annotations

from . import functional, reference
from ._core import __version__, active_isa, available_isas
from .layers import LSTM, RNN

__all__ = [
    "LSTM",
    "RNN",
    "__version__",
    "active_isa",
    "available_isas",
    "functional",
    "reference",
]
