"""The user-facing docs name every setting and every series the gateway has."""

from __future__ import annotations

import os

import attrs

from twisted_gateway import metrics
from twisted_gateway.config import _SECTIONS, GatewayConfig

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def read(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def test_every_configuration_key_is_documented():
    text = read("configuration.md")
    acme = read("certificates.md")  # the acme keys' own table names them without the prefix
    missing = []
    for f in attrs.fields(GatewayConfig):
        if f.metadata.get("internal"):
            continue
        if f.name in _SECTIONS:
            for key in attrs.fields(_SECTIONS[f.name]):
                dotted = f"`{f.name}.{key.name}`"
                if dotted not in text and not (f.name == "acme" and f"`{key.name}`" in acme):
                    missing.append(f"{f.name}.{key.name}")
        elif f"`{f.name}`" not in text:
            missing.append(f.name)
    assert not missing, f"undocumented keys in docs/configuration.md: {missing}"


def test_every_metric_is_documented():
    text = read("metrics.md")
    names = set()
    for registry in (metrics.REGISTRY, metrics.SUPERVISOR_REGISTRY):
        for family in registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            names.add(name)
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"series missing from docs/metrics.md: {missing}"
