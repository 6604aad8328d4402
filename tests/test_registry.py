from __future__ import annotations  # string annotations, as plugin modules often have

import pytest

from seq2seq.errors import ConfigError
from seq2seq.registry import HEADS, Registry


@pytest.fixture
def widgets() -> Registry:
    reg = Registry("widget")

    @reg.register("gear")
    def gear(d_model: int, teeth: int = 8, ratio: float = 1.0, label: str | None = None) -> dict:
        return {"d_model": d_model, "teeth": teeth, "ratio": ratio, "label": label}

    return reg


def test_build_passes_options_and_only_the_context_the_constructor_asks_for(widgets):
    built = widgets.build({"name": "gear", "teeth": 12}, d_model=64, vocab_size=99)
    assert built == {"d_model": 64, "teeth": 12, "ratio": 1.0, "label": None}


def test_unknown_name_lists_the_registered_names_and_the_closest(widgets):
    with pytest.raises(ConfigError, match=r"unknown widget `gaer`\. Did you mean `gear`\?.*Registered widgets: gear"):
        widgets.build({"name": "gaer"})


def test_unknown_option_names_itself_and_the_accepted_options(widgets):
    expected = r"`widget\.teth`.*Did you mean `teeth`.*Accepted options: teeth, ratio, label"
    with pytest.raises(ConfigError, match=expected):
        widgets.build({"name": "gear", "teth": 3}, d_model=8)


def test_an_option_that_duplicates_a_framework_value_is_rejected(widgets):
    with pytest.raises(ConfigError, match="set by the framework"):
        widgets.build({"name": "gear", "d_model": 3}, d_model=8)


def test_option_types_are_checked(widgets):
    with pytest.raises(ConfigError, match=r"`widget\.teeth` must be"):
        widgets.build({"name": "gear", "teeth": "many"}, d_model=8)
    with pytest.raises(ConfigError, match=r"`widget\.teeth` must be"):
        widgets.build({"name": "gear", "teeth": True}, d_model=8)
    assert widgets.build({"name": "gear", "ratio": 2}, d_model=8)["ratio"] == 2  # an int is a fine float


def test_a_missing_required_option_is_named():
    reg = Registry("widget")
    reg.register("bolt")(lambda size, thread=1: size)
    with pytest.raises(ConfigError, match="needs option"):
        reg.build({"name": "bolt"})


def test_a_real_name_clash_names_both_definitions(widgets):
    def other_gear() -> None: ...

    with pytest.raises(ValueError, match=r"defined twice: by .*gear and by .*other_gear"):
        widgets.register("gear")(other_gear)


def test_the_core_components_are_registered():
    assert "linear" in HEADS.names()
