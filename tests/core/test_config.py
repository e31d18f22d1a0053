"""Run configs: shipped configs found from any folder, and `base:` inheritance (dora_shapegen.config)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from dora_shapegen.config import CONFIG_DIR, load_yaml, resolve_config_path


def write(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_a_config_overrides_its_base_key_by_key_and_replaces_lists(tmp_path):
    write(
        tmp_path / "a.yaml",
        {"model": {"width": 64, "heads": 4}, "schedule": {"tokens": [256, 512]}, "seed": 0},
    )
    write(tmp_path / "b.yaml", {"base": "a.yaml", "model": {"width": 128}, "seed": 1})
    child = write(tmp_path / "sub" / "c.yaml", {"base": "../b.yaml", "schedule": {"tokens": [128]}})
    assert load_yaml(child) == {"model": {"width": 128, "heads": 4}, "schedule": {"tokens": [128]}, "seed": 1}


def test_a_base_loop_and_a_missing_base_are_clear_errors(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ValueError, match="loop"):
        load_yaml(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"base": "nowhere.yaml"})
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_yaml(tmp_path / "c.yaml")


def test_the_quickstart_vae_is_the_small_vae_with_its_overrides(tmp_path):
    small, quickstart = (
        load_yaml(CONFIG_DIR / "vae" / "small.yaml"),
        load_yaml(CONFIG_DIR / "quickstart" / "vae.yaml"),
    )
    assert "base" not in quickstart
    assert quickstart["model"] == small["model"] | {"local_attention": False, "num_freqs": 3}
    assert quickstart["training"]["learning_rate"] == 1e-3 and small["training"]["learning_rate"] == 3e-3
    assert quickstart["training"]["kl_weight"] == small["training"]["kl_weight"]
    # A copied config folder finds its base among the shipped configs.
    copy = tmp_path / "my_quickstart"
    shutil.copytree(CONFIG_DIR / "quickstart", copy)
    assert load_yaml(copy / "vae.yaml") == quickstart


def test_shipped_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/vae/tiny.yaml") == CONFIG_DIR / "vae" / "tiny.yaml"
    assert resolve_config_path("vae/tiny.yaml") == CONFIG_DIR / "vae" / "tiny.yaml"
    own = write(tmp_path / "configs" / "vae" / "tiny.yaml", {"model": {}})
    assert resolve_config_path("configs/vae/tiny.yaml").resolve() == own  # a user's own file wins
    with pytest.raises(FileNotFoundError):
        resolve_config_path("configs/vae/none.yaml")
