from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

def active_isa() -> str: ...
def available_isas() -> list[str]: ...
def compiled_isas() -> list[str]: ...
def _set_isa(name: str) -> None: ...
def activation(name: Literal["sigmoid", "tanh", "relu"], x: npt.ArrayLike) -> np.ndarray: ...

class PackedLayer:
    @property
    def isa(self) -> str: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def cell(self) -> Literal["lstm", "rnn_tanh", "rnn_relu"]: ...
    @property
    def input_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def has_bias(self) -> bool: ...

class TrainingState: ...

def pack(
    cell: Literal["lstm", "rnn_tanh", "rnn_relu"],
    weight_ih: npt.ArrayLike,
    weight_hh: npt.ArrayLike,
    bias_ih: npt.ArrayLike | None = None,
    bias_hh: npt.ArrayLike | None = None,
) -> PackedLayer: ...
def forward(
    layer: PackedLayer,
    x: npt.ArrayLike,
    h0: npt.ArrayLike | None = None,
    c0: npt.ArrayLike | None = None,
    training: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, TrainingState | None]: ...
def backward(
    state: TrainingState,
    grad_out: npt.ArrayLike | None = None,
    grad_h_n: npt.ArrayLike | None = None,
    grad_c_n: npt.ArrayLike | None = None,
    grad_weight_ih: np.ndarray | None = None,
    grad_weight_hh: np.ndarray | None = None,
    grad_bias_ih: np.ndarray | None = None,
    grad_bias_hh: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...
