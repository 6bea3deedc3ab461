"""Every config group composes and builds; bad overrides fail with a clear message, exit code and no traceback."""
import re

import pytest
import yaml
from conftest import REPO, run_script, tiny_overrides

from cnnpipe.model import build_model

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
          for g in ("model", "pool", "backend", "data", "optim", "debug", "experiment")}


def _stated(node, prefix=""):
    """(dotted key, value) for every leaf a YAML config file states (lists of layers compared whole)."""
    for k, v in node.items():
        if k in ("defaults", "hydra"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _stated(v, key + ".")
        else:
            yield key, v


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_option_composes_to_what_its_file_states(compose_cfg, group, option):
    """Choosing group=option gives exactly the values the option's file states, and a model that builds."""
    from omegaconf import OmegaConf
    cfg = compose_cfg([f"{group}={option}"])
    stated = yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text()) or {}
    package = "" if group in ("debug", "experiment") else group + "."      # @package _global_ files
    for key, value in _stated(stated, package):
        got = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True) if key.endswith("layers") else \
            OmegaConf.select(cfg, key)
        if key.endswith("layers"):
            got = [{k: v for k, v in layer.items() if v is not None} for layer in got]
            value = [{k: (cfg.data.num_classes if v == "${data.num_classes}" else v) for k, v in layer.items()}
                     for layer in value]
        elif isinstance(value, str) and "${" in value:
            continue                                        # interpolations: resolved against the rest
        assert got == value, (key, got, value)
    model = build_model(cfg)
    assert model.out_shape == (cfg.data.num_classes,)
    assert len(model.layers) == len(cfg.model.layers)


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_a_group_option_states_only_what_it_changes(group, option, compose_cfg):
    """Every default is stated once: no key of a group file repeats the value it would have without the file (the
    schema default in cnnpipe/config.py; for an experiment, the config its own group choices give)."""
    from omegaconf import OmegaConf

    from cnnpipe.config import ModelConf, TrainConf
    stated = yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text()) or {}
    if group == "experiment":                                                # @package _global_, picks groups
        picks = [f"{k.removeprefix('override /')}={v}" for d in stated.get("defaults", []) if isinstance(d, dict)
                 for k, v in d.items()]
        base, package = compose_cfg(picks), ""
    else:
        base = OmegaConf.structured(TrainConf(model=ModelConf()))
        package = "" if group == "debug" else group + "."                  # debug/: @package _global_
    repeated = [key for key, value in _stated(stated, package) if OmegaConf.select(base, key) == value]
    assert not repeated, f"conf/{group}/{option}.yaml restates {repeated}, which it would have anyway"


def test_the_optuna_searches_state_their_shared_sweeper_settings_once(compose_cfg):
    """direction and the sampler's seed live in conf/hydra/sweeper/optuna_search.yaml, which each search picks."""
    from omegaconf import OmegaConf
    shared = dict(_stated(yaml.safe_load((REPO / "conf/hydra/sweeper/optuna_search.yaml").read_text())))
    for path in sorted((REPO / "conf" / "hparams_search").glob("*.yaml")):
        own = dict(_stated(yaml.safe_load(path.read_text())["hydra"]["sweeper"]))
        assert not shared.keys() & own.keys(), (path.name, shared.keys() & own.keys())
        sweeper = compose_cfg([f"hparams_search={path.stem}"], return_hydra_config=True).hydra.sweeper
        assert {key: OmegaConf.select(sweeper, key) for key in shared} == shared, path.name


def test_the_readme_lists_every_config_option_and_only_those():
    """The configuration table names each option of each group (`model/` row: `lenet5`, ...)."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| group / node | options |"):readme.index("A layer stack is a list")]
    for group in ("model", "pool", "backend", "data", "optim", "debug", "experiment"):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{group}/` |"))
        listed = set(re.findall(r"`([a-z0-9_]+)`", row.split("|")[2]))
        assert set(GROUPS[group]) <= listed, (group, set(GROUPS[group]) - listed)
        assert {o for o in listed if (REPO / "conf" / group).joinpath(f"{o}.yaml").exists()} == set(GROUPS[group])


def test_pool_mean_switches_every_pool_and_conv_k_every_conv(compose_cfg):
    model = build_model(compose_cfg(["model=convnet", "pool=mean", "conv.k=3"]))
    assert [layer.mode for layer in model.layers if layer.kind == "pool"] == ["mean", "mean"]
    assert [layer.K for layer in model.layers if layer.kind == "conv"] == [3, 3]


def test_a_layer_keeps_its_own_settings(compose_cfg):
    model = build_model(compose_cfg(["model=custom_example", "conv.k=5", "pool=mean"]))
    convs = [layer for layer in model.layers if layer.kind == "conv"]
    assert [c.K for c in convs] == [3, 4] and convs[1].stride == 2
    pool = next(layer for layer in model.layers if layer.kind == "pool")
    assert (pool.size, pool.stride, pool.mode) == (3, 2, "mean")


BAD = [
    (["conv.k=abc"], "conv.k"),                       # Hydra's own type error
    (["trainer.epoch=3"], "trainer.epoch"),            # unknown key
    (["pool=maxx"], "pool/maxx"),                      # unknown option
    (["conv.k=15"], "conv2"),                          # impossible architecture: names the layer and shapes
    (["model.activation=swish"], "swish"),
    (["backend=numpy", "backend.name=cuda"], "Unknown backend 'cuda'"),
    (["dtype=float16"], "dtype"),
    (["optim.schedule=linear"], "schedule"),
    (["trainer.seed=-1"], "trainer.seed=-1"),
]


@pytest.mark.parametrize("overrides, needle", BAD, ids=lambda v: str(v))
def test_bad_overrides_fail_clearly(tmp_path, fashion_root, overrides, needle):
    r = run_script("train.py", *tiny_overrides(fashion_root), *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert needle in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr + r.stdout


def test_architecture_errors_come_before_data_loading(tmp_path):
    """An impossible stack fails even when no dataset exists anywhere."""
    r = run_script("train.py", "conv.k=15", f"data.root={tmp_path / 'nothing'}", "data.download=false",
                   "data.name=mnist", f"hydra.run.dir={tmp_path / 'run'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "smaller than 1x1" in err and "dataset" not in err


def test_missing_dataset_offline_is_a_clear_error(tmp_path):
    r = run_script("train.py", "data=kmnist", f"data.root={tmp_path / 'empty'}", "data.download=false",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "kmnist" in err.lower() and str(tmp_path / "empty") in err
    assert "Traceback" not in r.stderr
