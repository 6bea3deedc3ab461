"""The same network built in PyTorch, with the same weights, and its training step: the gradient oracle in tests,
the accuracy peer (scripts/torch_peer.py) and the speed peer in the benchmark."""
from __future__ import annotations

import numpy as np

from cnnpipe.layers import Conv2d, Dense, Dropout, Flatten, Pool2d, ReLU, Sigmoid, Tanh
from cnnpipe.step import StepResult


def torch_twin(model, copy_weights=True):
    """nn.Sequential mirroring `model` layer by layer (weights copied when asked)."""
    import torch
    from torch import nn
    dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    mods = []
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            top, bottom, left, right = layer.pads
            if not layer.sym:
                mods.append(nn.ZeroPad2d((left, right, top, bottom)))
            mods.append(nn.Conv2d(layer.in_shape[0], layer.F, layer.K, stride=layer.stride,
                                  padding=top if layer.sym else 0))
        elif isinstance(layer, Pool2d):
            pool = nn.MaxPool2d if layer.mode == "max" else nn.AvgPool2d
            mods.append(pool(layer.size, layer.stride))
        elif isinstance(layer, Dense):
            mods.append(nn.Linear(layer.in_shape[0], layer.units))
        elif isinstance(layer, Flatten):
            mods.append(nn.Flatten())
        elif isinstance(layer, Dropout):
            mods.append(nn.Dropout(layer.p))
        else:
            mods.append({ReLU: nn.ReLU, Tanh: nn.Tanh, Sigmoid: nn.Sigmoid}[type(layer)]())
    net = nn.Sequential(*mods).to(dtype)
    if copy_weights:
        params = [layer for layer in model.layers if layer.params]
        weighted = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            for layer, m in zip(params, weighted):
                m.weight.copy_(torch.from_numpy(layer.params["W"]))
                m.bias.copy_(torch.from_numpy(layer.params["b"]))
    return net


def torch_optimizer(net, o):
    """torch.optim's SGD or Adam with the settings of cfg.optim (the formulas ours reproduce)."""
    import torch
    if o.name == "sgd":
        return torch.optim.SGD(net.parameters(), o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.Adam(net.parameters(), o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def torch_train_step(net, opt, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
    """The PyTorch peer of cnnpipe.step.train_step: forward, cross-entropy, backward, optimizer step, and the loss
    and accuracy read back as a PyTorch user's loop does."""
    import torch
    for g in opt.param_groups:
        g["lr"] = lr
    logits = net(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    preds = logits.argmax(1).numpy()
    return StepResult(loss.item(), int((preds == y).sum()), len(y), labels=y, preds=preds)
