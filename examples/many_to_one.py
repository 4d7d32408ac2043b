"""Many-to-one: an LSTM reads a whole sequence, and its final state feeds a classifier.

The task: is the sum of a sequence of numbers positive? The sequences have different lengths,
so the batch is padded and ``lengths=`` tells the LSTM where each one ends: h_n then holds each
sequence's state at its own last step. A NumPy linear layer and softmax turn h_n into class
probabilities. The loss depends on h_n only, so its gradient enters the LSTM through
``grad_state`` and no per-step output gradient is needed (``grad_out=None``).

Run it with ``python examples/many_to_one.py``.
"""

from __future__ import annotations

import numpy as np

import fastrnn

MAX_LEN = 20
HIDDEN = 32
BATCH = 64


def make_batch(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, ...]:
    """Padded sequences (batch, MAX_LEN, 1), lengths in [1, MAX_LEN], labels: sum > 0."""
    lengths = rng.integers(1, MAX_LEN + 1, size=batch)
    # The padding past each length is noise on purpose: with lengths= the LSTM never reads it.
    x = rng.standard_normal((batch, MAX_LEN, 1)).astype(np.float32)
    inside = np.arange(MAX_LEN) < lengths[:, None]
    labels = ((x[..., 0] * inside).sum(axis=1) > 0).astype(np.int64)
    return x, lengths, labels


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


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = -np.log(probs[rows, labels] + 1e-12).mean()
    grad = probs.copy()
    grad[rows, labels] -= 1
    return float(loss), grad / len(labels)


def main(steps: int = 300, seed: int = 0, verbose: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    lstm = fastrnn.LSTM(1, HIDDEN, batch_first=True, seed=seed)
    # The classifier on top of h_n: 2 classes (sum <= 0, sum > 0).
    w = rng.uniform(-0.1, 0.1, (2, HIDDEN)).astype(np.float32)
    b = np.zeros(2, np.float32)
    adam = Adam(lr=0.01)
    x_test, lengths_test, labels_test = make_batch(rng, 512)

    def evaluate() -> tuple[float, float]:
        lstm.eval()  # no tape is kept for backward
        _, (h_n, _) = lstm(x_test, lengths=lengths_test)
        lstm.train()
        logits = h_n[-1] @ w.T + b
        loss, _ = softmax_cross_entropy(logits, labels_test)
        return loss, float((logits.argmax(axis=1) == labels_test).mean())

    initial_loss, initial_accuracy = evaluate()
    for step in range(1, steps + 1):
        x, lengths, labels = make_batch(rng, BATCH)
        _, (h_n, _) = lstm(x, lengths=lengths)  # h_n: (1, BATCH, HIDDEN)
        h = h_n[-1]  # the last layer's final state
        loss, grad_logits = softmax_cross_entropy(h @ w.T + b, labels)

        # Backward: the classifier by hand, then the LSTM from dL/dh_n through time.
        grad_w, grad_b = grad_logits.T @ h, grad_logits.sum(axis=0)
        grad_h_n = (grad_logits @ w)[None]  # shaped like h_n
        lstm.backward(None, grad_state=(grad_h_n, None))  # no loss on out or on c_n

        for name, grad in lstm.grads.items():
            setattr(lstm, name, adam(name, getattr(lstm, name), grad))
        lstm.zero_grad()  # backward adds into grads
        w, b = adam("w", w, grad_w), adam("b", b, grad_b)

        if verbose and step % 50 == 0:
            test_loss, test_accuracy = evaluate()
            print(
                f"step {step:4d}  train loss {loss:.3f}  test loss {test_loss:.3f}  "
                f"test accuracy {test_accuracy:.1%}"
            )

    final_loss, final_accuracy = evaluate()
    return {
        "initial_loss": initial_loss,
        "initial_accuracy": initial_accuracy,
        "final_loss": final_loss,
        "final_accuracy": final_accuracy,
    }


if __name__ == "__main__":
    print(main(verbose=True))
