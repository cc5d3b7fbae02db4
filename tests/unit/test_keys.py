"""Canonicalisation and key layout of the exact result cache (no Redis needed)."""

from __future__ import annotations

import redis

from caches.keys import canonical_json, canonical_text, key_prefix, make_key
from caches.result import ResultCache, glob_escape, safe_part


def _cache() -> ResultCache:
    # the client never connects: key building is pure
    return ResultCache(redis.Redis(host="127.0.0.1", port=1))


def test_canonical_text_whitespace_case_unicode() -> None:
    assert canonical_text("  What   is\tthe\nPTO policy? ") == "what is the pto policy?"
    assert canonical_text("ＰＴＯ ﬁle") == canonical_text("PTO file")  # NFKC: full-width, ligature
    assert canonical_text("Straße") == canonical_text("STRASSE")  # casefold, not lower


def test_canonical_json_order_and_floats() -> None:
    assert canonical_json({"b": 1.0, "a": "X "}) == canonical_json({"a": "x", "b": 1})
    assert canonical_json({"a": None, "b": 2}) == canonical_json({"b": 2})


def test_chat_key_ignores_fields_that_do_not_change_the_answer() -> None:
    cache = _cache()
    base = {"messages": [{"role": "user", "content": "What is the PTO policy?"}], "temperature": 0}
    noisy = {
        **base,
        "messages": [{"role": "user", "content": "  what is the   PTO policy? "}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "alice",
        "request_id": "r-123",
        "model": "other-name",
    }
    k1 = cache.chat_key(tenant="t1", model="m", version="1", request=base)
    assert k1 == cache.chat_key(tenant="t1", model="m", version="1", request=noisy)


def test_chat_key_changes_with_everything_that_matters() -> None:
    cache = _cache()
    base = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    k = cache.chat_key(tenant="t1", model="m", version="1", request=base)
    assert k != cache.chat_key(tenant="t2", model="m", version="1", request=base)
    assert k != cache.chat_key(tenant="t1", model="m2", version="1", request=base)
    assert k != cache.chat_key(tenant="t1", model="m", version="2", request=base)
    assert k != cache.chat_key(tenant="t1", model="m", version="1", request={**base, "temperature": 0.7})
    assert k != cache.chat_key(tenant="t1", model="m", version="1", request={**base, "max_tokens": 5})
    sys_msg = {"messages": [{"role": "system", "content": "be brief"}, *base["messages"]], "temperature": 0}
    assert k != cache.chat_key(tenant="t1", model="m", version="1", request=sys_msg)


def test_key_layout_and_prefixes() -> None:
    cache = _cache()
    k = cache.chat_key(tenant="acme", model="llama3:8b", version="7", request={"messages": []})
    ns, model, version, ident = k.split(":")
    assert (ns, model, version, len(ident)) == ("res.acme", "llama3%3A8b", "7", 64)
    assert k.startswith(key_prefix("res.acme", safe_part("llama3:8b"), "7"))
    assert make_key("n", "m", "v", "x") == "n:m:v:x"
    assert ResultCache.tenant_of(k) == "acme"


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
