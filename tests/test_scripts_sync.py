"""The Lua headers and the Python enums name the same return codes."""

import re

import pytest

from engine.store import scripts


@pytest.mark.parametrize("name", sorted(scripts.OUTCOMES))
def test_header_matches_enum(name: str) -> None:
    source = scripts.load(name).source
    header = source.split("\n\n", 1)[0] if "-- RETURNS" not in source else \
        source[source.index("-- RETURNS"):]
    codes = {}
    for line in header.splitlines():
        if not line.startswith("--"):
            break
        m = re.match(r"^--\s+(\d+)\s+([A-Z_]+)\b", line)
        if m:
            codes[int(m.group(1))] = m.group(2)
    enum = scripts.OUTCOMES[name]
    assert codes == {e.value: e.name for e in enum}


@pytest.mark.parametrize("name", sorted(scripts.OUTCOMES))
def test_header_lists_keys_and_argv(name: str) -> None:
    src = scripts.load(name).source
    assert "-- KEYS" in src and "-- ARGV" in src and "-- RETURNS" in src
    used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", src)}
    header_keys = src[src.index("-- KEYS"):src.index("-- ARGV")]
    declared = {int(n) for n in re.findall(r"^--\s+(\d+)\s", header_keys, re.M)}
    assert used <= declared


def test_unknown_code_is_an_explicit_error() -> None:
    with pytest.raises(scripts.UnknownScriptReply):
        scripts.outcome(scripts.GrabOutcome, 99)
