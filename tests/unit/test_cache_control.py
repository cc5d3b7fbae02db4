"""Cache-Control request directives: a malformed `max-age` is ignored (the module's promise),
whatever the header holds; in particular digits are ASCII digits, not what `str.isdigit()` takes."""

from __future__ import annotations

import random
import sys

import pytest

from caches.cache_control import CacheControl

# Every character str.isdigit() takes that is not 0-9: superscripts, Arabic-Indic, Devanagari,
# circled, fullwidth... `float()` refuses some ("²") and reads others ("٣" as 3).
UNICODE_DIGITS = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isdigit() and not c.isascii()]


@pytest.mark.parametrize("value", ["²", "1¹", "¹⁰", "٣", "１０", "①", "5\u0663", '"²"'])
def test_non_ascii_digits_are_a_malformed_max_age_ignored(value: str) -> None:
    # "max-age=²" was a 500: isdigit() said yes, float() raised ValueError
    ctl = CacheControl.parse(f"max-age={value}")
    assert ctl == CacheControl() and ctl.lookup


def test_no_unicode_digit_raises_or_counts() -> None:
    assert len(UNICODE_DIGITS) > 100
    for c in UNICODE_DIGITS:
        for header in (f"max-age={c}", f"max-age=1{c}", f"max-age={c}0, no-store"):
            assert CacheControl.parse(header).max_age is None, (header, c)


def test_the_other_directives_still_count_beside_a_malformed_max_age() -> None:
    ctl = CacheControl.parse("no-store, max-age=²")
    assert ctl.no_store and ctl.max_age is None
    assert CacheControl.parse("max-age=³, max-age=7").max_age == 7


@pytest.mark.parametrize(
    ("header", "max_age"),
    [("max-age=0", 0.0), ("max-age=60", 60.0), ('max-age="10"', 10.0), (" MAX-AGE = 5 ", 5.0),
     ("max-age=007", 7.0), ("max-age=" + "9" * 5000, float("inf")),  # longer than int()'s limit: "forever"
     ("max-age=-1", None), ("max-age=1.5", None), ("max-age=+3", None), ("max-age=1e3", None),
     ("max-age=", None), ("max-age", None), ("max-age=0x10", None), ("max-age=1_000", None)],
)
def test_ascii_delta_seconds_only(header: str, max_age: float | None) -> None:
    assert CacheControl.parse(header).max_age == max_age


def test_no_header_raises() -> None:
    # the promise is "ignored, not rejected": no header value may raise (a 500 on every route)
    rng = random.Random(9111)
    chars = ["0", "1", "9", "-", "+", ".", "e", "_", '"', " ", "\t", "\u00a0", "\x00", "\ud800", "=",
             "²", "¹", "٣", "１", *rng.sample(UNICODE_DIGITS, 20)]
    names = ["max-age", "MAX-AGE", "no-cache", "no-store", "private", ""]
    for _ in range(20_000):
        directives = [f"{rng.choice(names)}={''.join(rng.choices(chars, k=rng.randint(0, 4)))}"
                      for _ in range(rng.randint(0, 3))]
        header = rng.choice([",", ", ", ";"]).join(directives)
        ctl = CacheControl.parse(header)
        assert ctl.max_age is None or ctl.max_age >= 0, header
