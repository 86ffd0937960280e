"""Adapter names and `model` references: only safe names pass, versions are integers >= 1."""

import pytest

from server.registry.errors import InvalidNameError
from server.registry.names import ModelRef, adapter_key, check_name, parse_model_ref


@pytest.mark.parametrize("name", ["a", "support-bot", "Llama_3.1-chat", "x" * 64, "0day"])
def test_safe_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-flag", "_x", "a/b", "../etc", "a..b", "a@1", "x" * 65, "a b", "naïve", "a\\b", "a\n"],
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(InvalidNameError, match="invalid adapter name"):
        check_name(name)


def test_model_reference_parsing():
    assert parse_model_ref("bot") == ModelRef("bot", None)
    assert parse_model_ref("bot@12") == ModelRef("bot", 12)
    assert adapter_key("bot", 12) == "bot@12"


@pytest.mark.parametrize("model", ["bot@0", "bot@-1", "bot@01", "bot@x", "bot@", "bot@1@2", "@1", "../x@1"])
def test_malformed_model_references_are_refused(model):
    with pytest.raises(InvalidNameError):
        parse_model_ref(model)
