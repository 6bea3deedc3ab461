"""Softmax cross-entropy: the loss and its δ at the logits."""
import numpy as np


def softmax_cross_entropy(logits, y):
    """Mean loss over the batch and δ = ∂L/∂logits = (softmax - onehot) / N.   logits N,U; y N (int)."""
    N = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)                      # N,U  (stable)
    logsumexp = np.log(np.exp(z).sum(axis=1, keepdims=True))            # N,1
    logp = z - logsumexp                                                # N,U
    loss = -logp[np.arange(N), y].mean()
    delta = np.exp(logp)                                                # softmax, N,U
    delta[np.arange(N), y] -= 1
    delta /= N
    return float(loss), delta
