"""The deployments of prefect.yaml resolve to the configs they name: cifar10-weekly to the README's
"CIFAR-10" recipe block, key for key; each deployment of another dataset to its own model name."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _flow_module():
    spec = importlib.util.spec_from_file_location("resnet_pipeline_flow_recipes", REPO / "flows/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_recipe(title: str) -> dict:
    """The YAML under `# <title>` in the README's recipe block, up to the next comment or fence."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^\s*# {re.escape(title)}\b.*?\n((?:\s*#.*\n)*)((?:(?!\s*#|\s*```).*\n)+)", text, re.M)
    assert match, f"README: no recipe block '# {title}'"
    return yaml.safe_load(textwrap.dedent(match.group(2)))


def _resolved(name: str):
    pipeline = _flow_module()
    entry = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == name)
    parameters = pipeline.resnet_pipeline_flow.validate_parameters(dict(entry["parameters"]))
    for name in ("root", "lock_wait_seconds", "force"):  # not config keys
        parameters.pop(name)
    return pipeline.load_config(parameters.pop("params"), str(REPO), parameters.pop("overrides", None), **parameters)


def test_cifar10_weekly_resolves_to_the_readme_cifar10_recipe():
    recipe = readme_recipe("CIFAR-10")
    cfg = _resolved("cifar10-weekly").to_dict()
    assert set(recipe) == {"download", "train"}
    for group, values in recipe.items():
        assert {k: cfg[group][k] for k in values} == values, group
    assert recipe["train"]["global_batch_size"] == 128 and recipe["train"]["lr_decay_at"] == [32000, 48000]
    assert recipe["train"]["random_flip"] is True and recipe["train"]["augment"] == "cifar"
    steps_per_epoch = int(60000 * 0.8) // recipe["train"]["global_batch_size"]  # CIFAR-10's 60k images, 0.8 train
    assert abs(recipe["train"]["epochs"] * steps_per_epoch - 64000) < steps_per_epoch, "64k iterations in all"


def test_each_deployment_of_another_dataset_registers_under_its_own_name():
    names = {}
    for entry in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        cfg = _resolved(entry["name"])
        names.setdefault(cfg.register.model_name, set()).add(cfg.download.dataset)
        clone = entry["pull"][0]["prefect.deployments.steps.git_clone"]
        assert clone["clone_directory_name"] == entry["name"], "each deployment works in its own folder"
    assert all(len(datasets) == 1 for datasets in names.values()), names
