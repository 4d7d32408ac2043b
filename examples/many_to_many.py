"""Many-to-many: a bidirectional, two-layer GRU tags every step of a sequence.

The task: is x_t above the mean of its whole sequence? Each sequence is shifted by a random
offset, so x_t alone says nothing; the answer needs the steps before t *and* after it, which is
what the bidirectional layers give: out[:, t] holds the forward direction's summary of x_0..x_t
next to the reverse direction's summary of x_t..x_end. A NumPy linear layer turns each step's
output into a logit, and the per-step loss gradient goes into the GRU as ``grad_out``.
Dropout between the two layers is active in training mode only and draws its masks from the
layer's ``seed``.

Run it with ``python examples/many_to_many.py``.
"""

from __future__ import annotations

import numpy as np

import fastrnn

SEQ_LEN = 16
HIDDEN = 24
BATCH = 32


def make_batch(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (batch, SEQ_LEN, 1) and per-step labels (batch, SEQ_LEN): x_t > mean(x)."""
    offsets = rng.normal(0.0, 2.0, size=(batch, 1, 1))
    x = (offsets + rng.standard_normal((batch, SEQ_LEN, 1))).astype(np.float32)
    labels = (x[..., 0] > x[..., 0].mean(axis=1, keepdims=True)).astype(np.float32)
    return x, labels


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


def sigmoid_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy over every step, and its gradient with respect to the logits."""
    probs = 1 / (1 + np.exp(-logits))
    loss = -(labels * np.log(probs + 1e-12) + (1 - labels) * np.log(1 - probs + 1e-12)).mean()
    return float(loss), (probs - labels) / labels.size


def main(steps: int = 300, seed: int = 0, verbose: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    gru = fastrnn.GRU(
        1, HIDDEN, num_layers=2, bidirectional=True, dropout=0.1, batch_first=True, seed=seed
    )
    # out has 2 * HIDDEN features per step: forward and reverse directions side by side.
    w = rng.uniform(-0.1, 0.1, 2 * HIDDEN).astype(np.float32)
    b = np.zeros(1, np.float32)
    adam = Adam(lr=0.01)
    x_test, labels_test = make_batch(rng, 512)

    def evaluate() -> tuple[float, float]:
        gru.eval()  # no dropout, no tape
        out, _ = gru(x_test)
        gru.train()
        logits = out @ w + b
        loss, _ = sigmoid_cross_entropy(logits, labels_test)
        return loss, float(((logits > 0) == labels_test).mean())

    initial_loss, initial_accuracy = evaluate()
    for step in range(1, steps + 1):
        x, labels = make_batch(rng, BATCH)
        out, _ = gru(x)  # out: (BATCH, SEQ_LEN, 2 * HIDDEN) with batch_first
        loss, grad_logits = sigmoid_cross_entropy(out @ w + b, labels)

        # Backward: the per-step readout by hand, then the GRU from dL/d(out) at every step.
        grad_w = np.einsum("btf,bt->f", out, grad_logits)
        grad_b = grad_logits.sum(keepdims=True)
        gru.backward(grad_logits[..., None] * w, grad_state=None)  # no loss on h_n

        for name, grad in gru.grads.items():
            setattr(gru, name, adam(name, getattr(gru, name), grad))
        gru.zero_grad()
        w, b = adam("w", w, grad_w), adam("b", b, grad_b)

        if verbose and step % 50 == 0:
            test_loss, test_accuracy = evaluate()
            print(
                f"step {step:4d}  train loss {loss:.3f}  test loss {test_loss:.3f}  "
                f"per-step test accuracy {test_accuracy:.1%}"
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
