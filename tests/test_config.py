"""The default config validates, spells out every key, and bad configs fail clearly."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ConfigError

DEFAULT = "configs/shanghai.yaml"


def raw_default(root):
    return yaml.safe_load((root / DEFAULT).read_text(encoding="utf-8"))


def missing_keys(model: type[BaseModel], data: dict, path: str = "") -> list[str]:
    """Model fields that the YAML leaves to a code default (list items may omit keys)."""
    out = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in data:
            out.append(path + key)
            continue
        ann = field.annotation
        value = data[key]
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            out += missing_keys(ann, value, f"{path}{key}.")
    return out


def test_default_config_validates(root):
    cfg = load_config(root / DEFAULT)
    assert cfg.working_crs == "EPSG:32651"
    assert {t.district_name for t in cfg.targets} == {"浦东新区", "青浦区"}
    assert [t.required_mw for t in cfg.targets] == [150.0, 294.0]
    assert cfg.policy.coverage_rule_share == 0.5


def test_default_yaml_spells_out_every_section_key(root):
    """The YAML is the documentation of the defaults: no key hides in code."""
    assert missing_keys(PipelineConfig, raw_default(root)) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["roof"].update(setback_flat_mm=1000), "roof.setback_flat_mm: unknown key"),
    (lambda r: r["roof"].update(module_power_density_w_per_m2=-5), "module_power_density"),
    (lambda r: r["policy"].update(coverage_rule_share=1.5), "coverage_rule_share"),
    (lambda r: r["policy"]["coverage_share_by_type"].update(school=2.0), "not a share"),
    (lambda r: r.update(working_crs="EPSG:4326"), "geographic"),
    (lambda r: r["targets"][0].update(required_mw=0), "targets.0.required_mw"),
    (lambda r: r["sources"][0]["columns"].update(colour="x"), "unknown canonical column"),
])
def test_bad_configs_fail_with_the_key(root, tmp_path, mutate, message):
    raw = copy.deepcopy(raw_default(root))
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(p)
    assert str(p) in str(err.value)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
