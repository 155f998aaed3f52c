"""What the model learns from, on text: packing (alias padding_free), completion_only_loss, assistant_only_loss."""
import pytest
import yaml

from dpo_ds.config import ConfigError, DPOConfig
from dpo_ds.packing import layout_name


@pytest.mark.parametrize("kw,packed", [({}, False), ({"packing": True}, True), ({"padding_free": True}, True),
                                       ({"packing": True, "padding_free": True}, True),
                                       ({"packing": False, "padding_free": False}, False),
                                       ({"packing": "true"}, True)])
def test_packing_and_its_alias_padding_free_resolve_to_one_value(kw, packed):
    cfg = DPOConfig(**kw)
    assert cfg.packing is packed and cfg.padding_free is packed
    assert layout_name(cfg) == ("padding_free" if packed else "padded")


@pytest.mark.parametrize("packing,padding_free", [(True, False), (False, True)])
def test_contradicting_packing_and_padding_free_is_an_error(packing, padding_free):
    with pytest.raises(ConfigError, match=f"packing={packing} contradicts padding_free={padding_free}"):
        DPOConfig(packing=packing, padding_free=padding_free)


def test_saved_packing_config_reads_back_equal(tmp_path):
    cfg = DPOConfig(packing=True, prefix_sharing=True)
    cfg.save(str(tmp_path / "c.yaml"))
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert saved["packing"] is True and saved["padding_free"] is True
    back = DPOConfig.load(str(tmp_path / "c.yaml"))
    assert back == cfg and layout_name(back) == "prefix_sharing"
