"""Softmax cross-entropy: the loss and its δ at the logits."""
import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the classes, shifted by the max first so exp cannot overflow.   logits N,U -> N,U"""
    z = logits - logits.max(axis=1, keepdims=True)                      # N,U
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss over the batch and δ = ∂L/∂logits = (softmax - onehot) / N.   logits N,U; y N (int)."""
    N = logits.shape[0]
    logp = log_softmax(logits)                                          # N,U
    loss = -logp[np.arange(N), y].mean()
    delta = np.exp(logp)                                                # softmax, N,U
    delta[np.arange(N), y] -= 1
    delta /= N
    return float(loss), delta
