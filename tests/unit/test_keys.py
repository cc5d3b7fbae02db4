"""Canonicalisation and key layout of the exact result cache (no Redis needed)."""

from __future__ import annotations

from caches.keys import (
    canonical_json,
    canonical_text,
    glob_escape,
    key_prefix,
    make_key,
    model_version_match,
    safe_part,
)
from caches.result import ResultCache
from tests.support import FINGERPRINT, chat_key, model_identity


def test_canonical_json_is_structural_only() -> None:
    # key order is JSON structure; text and numbers are kept as written
    assert canonical_json({"b": 1, "a": "X "}) == canonical_json({"a": "X ", "b": 1})
    # an explicit null is not "absent": vLLM reads `tool_choice: null` otherwise (tools: no "auto")
    assert canonical_json({"a": None, "b": 2}) != canonical_json({"b": 2})
    assert canonical_json({"t": [{"x": None}]}) != canonical_json({"t": [{}]})
    for a, b in [("What is 3²?", "What is 32?"), ('print("Hello")', 'PRINT("hello")'), ("x >= 1", "x > 1"),
                 ("if x:\n    y", "if x:\n  y"), ("ＰＴＯ", "PTO"), ("café", "cafe\u0301")]:
        assert canonical_json({"q": a}) != canonical_json({"q": b}), (a, b)


def test_canonical_text_is_for_comparing_answers_only() -> None:
    assert canonical_text("  What   is\tthe\nPTO policy? ") == "what is the pto policy?"
    assert canonical_text("Straße") == canonical_text("STRASSE")  # casefold, not lower


def test_key_layout_and_prefixes() -> None:
    k = chat_key(tenant="acme", model="llama3:8b", version="7", request={"messages": [], "temperature": 0})
    ns, model, version, ident = k.split(":")
    sampling = model_identity("llama3:8b").sampling_digest[:16]  # the engine's defaults (here none)
    assert (ns, model, version, len(ident)) == ("res.{acme}", f"llama3%3A8b@{FINGERPRINT[:16]}.{sampling}", "7", 64)
    assert safe_part("a@b") != safe_part("a%40b") and "@" not in safe_part("a@b")
    assert make_key("n", "m", "v", "x") == "n:m:v:x"
    assert ResultCache.tenant_of(k) == "acme"
    assert key_prefix("res.acme", "m", "7") == "res.acme:m:7:"


def test_glob_escape() -> None:
    assert glob_escape("a*b?[c]") == "a\\*b\\?\\[c\\]"


def test_tenants_resolve_api_keys() -> None:
    import pytest

    from caches.tenancy import DEFAULT_TENANT, Tenants, Unauthorized, parse_keys

    assert Tenants().resolve(None) == DEFAULT_TENANT  # no keys configured: auth off
    assert Tenants.from_env({}).resolve("Bearer anything") == DEFAULT_TENANT
    tenants = Tenants.from_env({"TIERSERVE_API_KEYS": "k1=acme, k2=globex"})
    assert tenants.resolve("Bearer k1") == "acme"
    assert tenants.resolve("bearer  k2 ") == "globex"
    for bad in (None, "", "Bearer", "Basic k1", "Bearer k3"):
        with pytest.raises(Unauthorized):
            tenants.resolve(bad)
    assert parse_keys("a=x,,b=y") == {"a": "x", "b": "y"}
    with pytest.raises(ValueError):
        parse_keys("novalue")
    with pytest.raises(ValueError):
        Tenants({"k": "bad:tenant"})


def test_admin_keys_are_separate_from_tenant_keys() -> None:
    import pytest

    from caches.tenancy import AdminKeys, Forbidden

    with pytest.raises(Forbidden, match="TIERSERVE_ADMIN_KEYS"):
        AdminKeys.from_env({}).require("Bearer anything")  # none configured: closed, not open
    admins = AdminKeys.from_env({"TIERSERVE_ADMIN_KEYS": "a1, a2"})
    admins.require("Bearer a2")
    assert admins.is_admin("bearer a1") and not admins.is_admin("Bearer k1") and not admins.is_admin(None)
    with pytest.raises(Forbidden, match="admin key"):
        admins.require("Bearer k1")


def test_tenant_view_shows_a_tenant_only_its_own_numbers() -> None:
    from caches.tenancy import tenant_view

    exact = {"bytes": 999, "by_tenant": {"acme": {"hits": 3, "misses": 1}, "globex": {"hits": 7, "misses": 2}}}
    semantic = {"counters": {"hits": 10}, "scopes": {"sem.{acme}:m@f:1:x": {"entries": 2}, "sem.{globex}:m@f:1:y": {}}}
    lookups = {"exact": {"acme": {"hit": 3.0}, "globex": {"hit": 7.0}}}
    recs = {"bytes": 888, "available": True,
            "by_tenant": {"acme": {"hits": 4, "misses": 5}, "globex": {"hits": 6, "misses": 0}}}
    view = tenant_view("acme", exact=exact, semantic=semantic, lookups=lookups, recommendations=recs)
    assert view["exact"]["hits"] == 3 and list(view["semantic"]["scopes"]) == ["sem.{acme}:m@f:1:x"]
    assert view["lookups"] == {"exact": {"hit": 3.0}}
    assert view["recommendations"] == {"hits": 4, "misses": 5, "available": True}
    assert "globex" not in str(view) and "999" not in str(view) and "888" not in str(view)


def test_a_version_purge_keeps_to_its_model_and_version() -> None:
    """A SCAN pattern's ``*`` matches ':' too: the purge keeps only keys whose model and version
    sit where the key scheme puts them."""
    only = model_version_match("sem", "m", "e")
    assert only.match(b"sem.{t}:m@abc:e:scope:e:1") and only.match(b"sem.{t}:m:e:x")
    assert not only.match(b"sem.{t}:m@abc:2:scope:e:1")  # the current version's entry
    assert not only.match(b"sem.{t}:other:m@abc:e:1") and not only.match(b"sem.{t}:m2@abc:e:1")
    assert model_version_match("res", "m").match(b"res.{t}:m@abc:7:d") and not model_version_match(
        "res", "m").match(b"res.{t}:mm@abc:7:d")


def test_numbers_are_kept_as_written() -> None:
    # the engine gets the body unchanged and chat templates render tools with `tojson`:
    # `"default": 1.0` and `"default": 1` are two prompts, so two keys, at any depth
    assert canonical_json({"default": 1.0}) != canonical_json({"default": 1})
    assert canonical_json({"t": [{"p": {"x": 2.0}}]}) != canonical_json({"t": [{"p": {"x": 2}}]})
    assert canonical_json({"x": 1.5}) == canonical_json({"x": 1.5})
