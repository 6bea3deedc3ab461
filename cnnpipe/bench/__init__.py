"""The benchmark (python scripts/bench.py, `make bench`): the user's command, measured beside PyTorch.

    cli.py       the options, the sections in order, the files written (docs/bench.json, .md, the README section)
    runs.py      running scripts/train.py and scripts/torch_peer.py as a user does and reading their run directories
    headline.py  rounds of those runs with the backends taking turns; medians, spreads, paired ratios
    bare.py      the bare loop (cnnpipe.step.train_step alone): what the trainer and logging add (diagnosis only)
    cifar.py     CIFAR-10-shaped synthetic data in CIFAR's on-disk format
    kernels.py   conv and pool kernels against torch's ops
    startup.py   launch to the first step, cold and warm numba cache
    shared.py    two sweep jobs on two cores, one job beside a busy core
    report.py    markdown from the JSON, with the targets of docs/bench-targets.yaml
"""
