"""One-to-many: an LSTMCell generates a wave from a seed point, fed its own output each step.

The task: from a seed point p_0 = (sin φ, cos φ), generate p_k = (sin(φ + kω), cos(φ + kω)),
a sine wave and its cosine. The cosine is what tells a rising wave from a falling one, which a
single value could not. Each step, a NumPy linear layer reads the next point off the cell's h,
and that point is the cell's next input, in training as in generation.

Training unrolls the cell for SEQ_LEN calls and backpropagates through them in reverse order.
In training mode the cell keeps a tape per call, and ``cell.backward`` runs for the most recent
call not yet backpropagated: last in, first out, exactly the order BPTT needs. Because each
output was the next call's input, its gradient also gets the ``dx`` of that next call.
Generation then runs in eval mode, where no tape is kept, for longer than the training length.

Run it with ``python examples/one_to_many.py``.
"""

from __future__ import annotations

import numpy as np

import fastrnn

OMEGA = 2 * np.pi / 16  # one period every 16 steps
SEQ_LEN = 16  # steps unrolled in training
HIDDEN = 32
BATCH = 32


def wave(phases: np.ndarray, steps: int) -> np.ndarray:
    """Points (steps + 1, batch, 2) of the wave from each phase: index 0 is the seed."""
    angles = phases[None, :] + OMEGA * np.arange(steps + 1)[:, None]
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


class Adam:
    """Adam that returns a new array per update: fastrnn's parameters are read-only arrays,
    and assigning a new one is how a layer learns that its packed weights are out of date."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999) -> None:
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.moments: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def __call__(self, name: str, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        m, v, t = self.moments.get(name, (np.zeros_like(grad), np.zeros_like(grad), 0))
        m = self.beta1 * m + (1 - self.beta1) * grad
        v = self.beta2 * v + (1 - self.beta2) * grad**2
        t += 1
        self.moments[name] = (m, v, t)
        m_hat, v_hat = m / (1 - self.beta1**t), v / (1 - self.beta2**t)
        return param - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def generate(cell, w, b, seeds: np.ndarray, steps: int) -> np.ndarray:
    """Free-running generation: each output point is the next input. Returns (steps, batch, 2)."""
    point, state, points = seeds, None, []
    for _ in range(steps):
        state = cell(point, state)  # (h, c)
        point = state[0] @ w.T + b
        points.append(point)
    return np.stack(points)


def main(steps: int = 400, seed: int = 0, verbose: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    cell = fastrnn.LSTMCell(2, HIDDEN, seed=seed)
    w = rng.uniform(-0.1, 0.1, (2, HIDDEN)).astype(np.float32)  # readout: h -> next point
    b = np.zeros(2, np.float32)
    adam = Adam(lr=0.01)
    test_points = wave(rng.uniform(0, 2 * np.pi, 256), 3 * SEQ_LEN)  # 3x the training length

    def evaluate() -> float:
        cell.eval()  # streaming: no tape grows while we generate
        generated = generate(cell, w, b, test_points[0], 3 * SEQ_LEN)
        cell.train()
        return float(((generated - test_points[1:]) ** 2).mean())

    initial_mse = evaluate()
    losses = []
    for step in range(1, steps + 1):
        points = wave(rng.uniform(0, 2 * np.pi, BATCH), SEQ_LEN)
        hs, outputs, state, point = [], [], None, points[0]
        for _ in range(SEQ_LEN):  # forward: SEQ_LEN cell calls, each one pushed on the tape
            state = cell(point, state)
            point = state[0] @ w.T + b
            hs.append(state[0])
            outputs.append(point)
        errors = np.stack(outputs) - points[1:]
        losses.append(float((errors**2).mean()))

        # Backward through time, last call first (the order of the cell's tape).
        grad_outputs = 2 * errors / errors.size  # dL/d(output) of the loss at each step
        grad_w, grad_b = np.zeros_like(w), np.zeros_like(b)
        grad_h_next = np.zeros((BATCH, HIDDEN), np.float32)  # dL/dh_t from call t + 1
        grad_c_next = None  # likewise dL/dc_t; None means zeros
        grad_input_next = np.zeros((BATCH, 2), np.float32)  # dL/d(input of call t + 1)
        for t in reversed(range(SEQ_LEN)):
            # Output t was also the input of call t + 1, so its gradient has two parts.
            grad_output = grad_outputs[t] + grad_input_next
            grad_w += grad_output.T @ hs[t]
            grad_b += grad_output.sum(axis=0)
            grad_h = grad_output @ w + grad_h_next
            grad_input_next, (grad_h_next, grad_c_next) = cell.backward(grad_h, grad_c_next)

        for name, grad in cell.grads.items():
            setattr(cell, name, adam(name, getattr(cell, name), grad))
        cell.zero_grad()
        w, b = adam("w", w, grad_w), adam("b", b, grad_b)

        if verbose and step % 50 == 0:
            print(
                f"step {step:4d}  train loss {losses[-1]:.4f}  "
                f"generation MSE over {3 * SEQ_LEN} steps {evaluate():.4f}"
            )

    return {
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "initial_mse": initial_mse,
        "final_mse": evaluate(),
    }


if __name__ == "__main__":
    print(main(verbose=True))
