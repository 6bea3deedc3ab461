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
    for l in model.layers:
        if isinstance(l, Conv2d):
            t, b, le, r = l.pads
            if not l.sym:
                mods.append(nn.ZeroPad2d((le, r, t, b)))
            conv = nn.Conv2d(l.in_shape[0], l.F, l.K, stride=l.stride, padding=t if l.sym else 0)
            mods.append(conv)
        elif isinstance(l, Pool2d):
            mods.append(nn.MaxPool2d(l.size, l.stride) if l.mode == "max" else nn.AvgPool2d(l.size, l.stride))
        elif isinstance(l, Dense):
            mods.append(nn.Linear(l.in_shape[0], l.units))
        elif isinstance(l, Flatten):
            mods.append(nn.Flatten())
        elif isinstance(l, Dropout):
            mods.append(nn.Dropout(l.p))
        else:
            mods.append({ReLU: nn.ReLU, Tanh: nn.Tanh, Sigmoid: nn.Sigmoid}[type(l)]())
    net = nn.Sequential(*mods).to(dtype)
    if copy_weights:
        params = [l for l in model.layers if l.params]
        weighted = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            for l, m in zip(params, weighted):
                m.weight.copy_(torch.from_numpy(l.params["W"]))
                m.bias.copy_(torch.from_numpy(l.params["b"]))
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
    return StepResult(loss.item(), int((logits.argmax(1).numpy() == y).sum()), len(y))
