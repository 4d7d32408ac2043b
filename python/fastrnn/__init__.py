"""fastrnn: fast CPU recurrent layers and cells (RNN, LSTM, GRU) with torch.nn's interface.

The kernels are compiled for several instruction sets and the best one this CPU supports is
chosen at import; ``FASTRNN_ISA=scalar|avx2|avx512|neon`` forces one. Layer calls use
``get_num_threads()`` threads of fastrnn's own pool (``FASTRNN_NUM_THREADS`` or
``set_num_threads(n)``; by default the cores this process may use).
"""

from __future__ import annotations

from . import functional, reference
from ._core import __version__, active_isa, available_isas, get_num_threads, set_num_threads
from .layers import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "RNNCell",
    "__version__",
    "active_isa",
    "available_isas",
    "functional",
    "get_num_threads",
    "reference",
    "set_num_threads",
]
