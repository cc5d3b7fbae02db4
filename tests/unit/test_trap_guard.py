"""The trap guard sees text as written: symbols, superscripts, digits vs words, case in code."""

from __future__ import annotations

import pytest

from caches.semantic import tokens, trap_guard


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        # NFKC would turn these into the same text; a reader does not
        ("What is 3²?", "What is 32?", "symbol"),
        ("What is 3²?", "What is 3^2?", "symbol"),
        ("What is H₂O made of?", "What is H2O made of?", "substitution"),  # a rule before "symbol"
        ("Simplify ½ + x", "Simplify 1/2 + x", "symbol"),
        # operators
        ("Is x >= 3 when x is 3?", "Is x > 3 when x is 3?", "symbol"),
        ("What does a != b return in Python?", "What does a == b return in Python?", "symbol"),
        ("What is 6 * 7?", "What is 6 + 7?", "symbol"),
        ("What is 10 − 4?", "What is 10 4?", "symbol"),  # U+2212 minus sign
        # digits vs number words, and digits in another script
        ("What is 3 plus 4?", "What is three plus 4?", "number"),
        ("Can I order 2 cards at once?", "Can I order two new cards together?", "number"),
        ("What is ３?", "What is 3?", "number"),
        ("What is 32?", "What is 33?", "number"),
        # identifiers and code keep their letter case
        ('print("Hello")', 'PRINT("hello")', "case"),
        ("What does myVar hold after the loop?", "What does myvar hold after the loop?", "case"),
        ("Why is my_value None here?", "Why is MY_VALUE None here?", "case"),
        ("What does `len(x)` return?", "What does `Len(x)` return?", "case"),
        ("Is `a & b` the same as `a and b`?", "Is `a and b` the same as `a and b`?", "symbol"),
        # the same words with the numbers or an operator's operands in another order
        ("What is 2^10?", "What is 10^2?", "order"),
        ("What is 5 minus 3?", "What is 3 minus 5?", "order"),
        ("What is 5 - 3?", "What is 3 - 5?", "order"),
        ("What is 10 divided by 2?", "What is 2 divided by 10?", "order"),
        ("What is log base 2 of 8?", "What is log base 8 of 2?", "order"),
        ("What is 2 to the power of 10?", "What is 10 to the power of 2?", "order"),
        ("Simplify a/b", "Simplify b/a", "order"),
        # or the subject and the object (each served the other's answer at similarity 0.97-0.998
        # before these rules)
        ("Does the Sun orbit the Earth?", "Does the Earth orbit the Sun?", "order"),
        ("Did Germany invade Poland in 1939?", "Did Poland invade Germany in 1939?", "order"),
        ("Is Paris the capital of France?", "Is France the capital of Paris?", "order"),
        ("What is heavier, a kilogram of feathers or a pound of steel?",
         "What is heavier, a pound of feathers or a kilogram of steel?", "order"),
        # one function word exchanged for its counterpart
        ("Can I move money from my savings account?", "Can I move money to my savings account?", "flip"),
        ("In Python, is True and False equal to True?", "In Python, is True or False equal to True?", "flip"),
        ("What is on this week?", "What is on next week?", "flip"),
        ("Who is the CEO of Apple?", "Who was the CEO of Apple?", "flip"),
        ("Why was my card declined?", "Why was your card declined?", "flip"),
        # a minus sign is part of the number; a hyphen is not
        ("What is -5 squared?", "What is 5 squared?", "symbol"),
        ("Is -3 > 2?", "Is 3 > 2?", "symbol"),
    ],
)
def test_guard_sees_text_as_written(a: str, b: str, why: str) -> None:
    assert trap_guard(a, b) == why
    assert trap_guard(b, a) == why  # the rules are symmetric


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # case in plain prose does not change a question
        ("How do I change my PIN?", "how do i change my pin"),
        ("Where is my Visa card?", "where is my visa card"),
        # sentence punctuation is not a symbol
        ("Why was I charged a fee?!", "why was I charged a fee"),
        ("How long does a top-up take?", "How long does a top-up take"),
        ("Can I pay (in store) with my phone?", "Can I pay in store with my phone?"),
        ("I got this card & I can't activate it", "I got this card and I can't activate it"),
        # a semicolon is prose too: it does not make "ATM" an identifier
        ("The ATM ate my card; what now?", "the atm ate my card, what now?"),
        # canonically equivalent text (composed vs decomposed accents) is the same text
        ("Is the caf\u00e9 open?", "Is the cafe\u0301 open?"),
        # reordered words with one number, or a hyphen in a word or a range, keep their meaning
        ("Can I get a refund in 2 days?", "In 2 days can I get a refund?"),
        ("How do I reset my password quickly?", "How do I quickly reset my password?"),
        # function words reworded together, and a phrase moved: not one word flipped or two swapped
        ("How do I top up my card?", "How do you top up your card?"),
        ("Can I transfer money to my account from abroad?", "From abroad, can I transfer money to my account?"),
        ("Is the COVID-19 card fee waived?", "is the covid-19 card fee waived"),
        ("Will it arrive in 2-3 days?", "will it arrive in 2-3 days"),
    ],
)
def test_guard_passes_what_only_looks_different(a: str, b: str) -> None:
    assert trap_guard(a, b) is None


def test_tokens_do_not_apply_nfkc() -> None:
    assert tokens("3²") == ("3²",)
    assert tokens("ＰＩＮ") == ("ｐｉｎ",)  # fullwidth letters stay fullwidth (casefolded only)
    assert tokens("Don’t  Stop") == ("dont", "stop")


def test_code_indented_differently_is_a_trap() -> None:
    four = "Fix this:\ndef f(x):\n    if x:\n        return 1\n    return 2"
    moved = "Fix this:\ndef f(x):\n    if x:\n        return 1\n        return 2"
    assert trap_guard(four, moved) == "indentation"
    assert trap_guard(four, four.replace("    ", "  ")) == "indentation"
    assert trap_guard(four, four) is None
    # prose lines are not code: how a question is wrapped does not matter
    assert trap_guard("How do I\n  reset my card?", "How do I reset my card?") is None
