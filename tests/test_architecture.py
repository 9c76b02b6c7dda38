"""The import rules of the design, as `make lint` checks them (tests/architecture.py)."""

from __future__ import annotations

from tests import architecture

P = "resnet_pipeline"
TREE = {
    f"{P}/__init__.py": "",
    f"{P}/stages.py": f"from {P} import config\n",
    f"{P}/config.py": "X = 1\n",
    f"{P}/models/__init__.py": "",
    f"{P}/models/resnet.py": f"def build():\n    from {P}.config import X\n    return X\n",
    f"{P}/training/__init__.py": "",
    f"{P}/training/init.py": "from typing import TYPE_CHECKING\n"
    f"if TYPE_CHECKING:\n    from {P}.registry import Registry\n"
    "from ..registry.core import fetch\n",
    f"{P}/registry/__init__.py": f"from {P}.registry.stage import register\ndef open_registry(): ...\n",
    f"{P}/registry/core.py": "def fetch(): ...\n",
    f"{P}/registry/stage.py": f"def register():\n    from {P}.registry import open_registry\n",
    "flows/pipeline.py": f"from {P}.stages import run_stage\nfrom {P}.runlock import lock\n",
}


def test_a_broken_rule_and_a_cycle_are_named_with_file_and_line(tmp_path, monkeypatch):
    for name, text in TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(architecture, "ROOT", tmp_path)
    found = architecture.violations()
    text = "\n".join(found)
    assert f"{P}/models/resnet.py:2: imports {P}.config.X: models know nothing" in text
    assert f"{P}/training/init.py:4: imports {P}.registry.core.fetch: training imports no registry" in text
    assert "init.py:3" not in text, "a TYPE_CHECKING import is not a dependency"
    assert f"flows/pipeline.py:2: imports {P}.runlock.lock" in text and "flows/pipeline.py:1" not in text
    assert f"import cycle: {P}.registry -> {P}.registry.stage -> {P}.registry" in found
    assert len(found) == 4, found
    assert architecture.main() == 1


def test_the_package_keeps_the_import_rules():
    assert architecture.violations() == []
