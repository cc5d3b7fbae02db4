"""The lexical trap guard: why two similar questions must not share an answer.

Sentence embeddings score minimal edits near 1.0: "lock my card" / "unlock my card", "at 2pm" /
"at 2am", "x >= 3" / "x > 3" all land at cosine 0.8 to 0.99, above any useful threshold (see
``configs/semantic_calibration.png``). :func:`trap_guard` is a second-stage check on the nearest
candidate that catches such edits with lexical rules. A rule that fires costs at most a miss (the
model answers), never a wrong answer, so the rules lean towards firing.

The guard sees the text as written. It normalises to NFC only (composed and decomposed accents are
the same text), never NFKC: NFKC turns "3²" into "32", "３" into "3" and "ﬁ" into "fi", i.e. it
merges texts a reader (or an interpreter) tells apart. Plain words are compared casefolded ("How"
and "how" ask the same); letter case counts where it changes meaning: identifiers and code.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import NamedTuple

TOKEN_CACHE_SIZE = 65_536  # analysed texts kept (a query is checked up to 3 times per lookup)
NUMBER_OVERLAP = 0.5  # content-word Jaccard above which a differing number is a trap
NEGATION_OVERLAP = 0.5  # content-word Jaccard above which a differing negation is a trap


def _words(text: str) -> list[str]:
    return text.split()


# Unicode words (letters, digits incl. superscripts and fullwidth forms, "_" for identifiers), with
# currency and percent attached so "£50" and "50%" stay one token, and one inner apostrophe ("don't").
_TOKEN = re.compile(r"[\w£$€%]+(?:'\w+)?")
# runs of characters that are neither word nor space; only those holding an operator are kept
_NON_WORD = re.compile(r"[^\w\s]+")
# Characters that change what a question asks when added, removed or swapped: math and modifier
# symbols (Unicode Sm, Sk: + < = > | ~ ^ ± × ÷ ≤ ...) and these ASCII operators. Sentence punctuation
# (. , ; : ! ? ' " ( ) -) is not among them: paraphrases differ in it all the time; "!" or "-" count
# only inside an operator run ("!=", "->", "-="). A lone "&" is prose for "and" ("my card & PIN")
# unless the text looks like code.
_OPERATORS = frozenset("*/\\&#@")
_OPERATOR_CATEGORIES = frozenset({"Sm", "Sk"})
_PROSE_SYMBOLS = frozenset({"&"})
# A minus sign, not a hyphen or a binary minus: "-" right before a digit, at the start or after a
# space, a bracket or an operator ("-5 squared", "x=-3"; not "COVID-19", "2-3 days" or "5 - 3").
_SIGN = re.compile(r"(?:^|(?<=[\s(\[{=<>+*/^,]))-(?=\d)")
# A text that looks like code: letter case and every symbol in it are significant. (Not ";": prose
# uses it too.)
_CODE_MARKERS = re.compile(r"`|\w\(|[{}=]|::|->")

NEGATIONS = frozenset(
    _words(
        "not no never none nothing nobody nowhere neither nor without cannot non dont doesnt didnt isnt "
        "arent wasnt werent wont wouldnt cant couldnt shouldnt hasnt havent hadnt mustnt neednt aint"
    )
)
# spelled-out quantities: "3" and "three" are written differently, and the guard sees text as written
CARDINAL_WORDS = frozenset(
    _words(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
        "hundred thousand million billion"
    )
)
# words that carry a quantity or a point in time: a difference in any of them changes the answer
NUMBER_WORDS = frozenset(
    _words(
        "zero one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty "
        "hundred thousand million billion first second third fourth fifth half quarter double triple "
        "single am pm monday tuesday wednesday thursday friday saturday sunday weekday weekdays weekend "
        "weekends january february march april may june july august september october november december "
        "today tomorrow yesterday daily weekly monthly yearly annual annually morning evening night noon "
        "midnight"
    )
)
_OPPOSITE_PAIRS = _words(
    "most-least more-less more-fewer increase-decrease raise-lower higher-lower open-close open-closed "
    "on-off enable-disable lock-unlock buy-sell before-after include-exclude included-excluded "
    "add-remove start-stop start-end minimum-maximum min-max upload-download import-export in-out "
    "up-down full-part men-women male-female private-public free-paid early-late first-last old-new "
    "send-receive sent-received deposit-withdraw credit-debit allow-block accept-decline join-leave "
    "safe-unsafe legal-illegal above-below over-under"
)


def _symmetric(pairs: list[str]) -> dict[str, frozenset[str]]:
    """Pairs written "a-b" -> each word's counterparts, both ways."""
    out: dict[str, frozenset[str]] = {}
    for pair in pairs:
        a, b = pair.split("-")
        out[a] = out.get(a, frozenset()) | {b}
        out[b] = out.get(b, frozenset()) | {a}
    return out


OPPOSITES = _symmetric(_OPPOSITE_PAIRS)
ANTONYM_PREFIXES = ("un", "in", "im", "dis", "non", "ir", "il", "de")
# words whose presence or absence does not change a question (greetings, function words)
FILLERS = frozenset(
    _words(
        "hi hello hey please pls thanks thank you okay ok so um uh well just team there the a an my me i "
        "im is are do does can could would will to of for and or what whats how it its that this be in "
        "on at with your we our us any"
    )
)
DIRECTIONAL = frozenset(_words("from to into than vs versus between over instead"))
# Function words (most are FILLERS, so the rules above never see them) whose exchange alone
# reverses a question: "move money from / to my savings", "True and / or False", "this / next
# week", "who is / was the CEO", "my / your card". Only a single-word edit counts: a rewording
# changes such words all the time ("how do I top up my card" / "how do you top up your card").
_FLIP_PAIRS = _words(
    "from-to from-into and-or this-next this-last next-last is-was are-were does-did do-did has-had "
    "have-had can-could will-would my-your his-her he-she"
)
FLIPS = _symmetric(_FLIP_PAIRS)


class _Text(NamedTuple):
    """One text as the guard sees it (computed once per text, cached)."""

    tokens: tuple[str, ...]  # casefolded words, apostrophes dropped
    spellings: dict[str, frozenset[str]]  # casefolded word -> the spellings it was written in
    symbols: tuple[str, ...]  # operator runs and No characters (², ½, ₂), sorted: a multiset
    code: bool  # looks like code: any difference in letter case matters
    indents: tuple[str, ...]  # leading whitespace of each non-blank line (Python's blocks are these)


@lru_cache(maxsize=TOKEN_CACHE_SIZE)
def _analyse(text: str) -> _Text:
    t = unicodedata.normalize("NFC", text).replace("\u2019", "'")
    spellings: dict[str, set[str]] = {}
    tokens: list[str] = []
    for raw in _TOKEN.findall(t):
        word = raw.replace("'", "")
        folded = word.casefold()
        tokens.append(folded)
        spellings.setdefault(folded, set()).add(word)
    code = _CODE_MARKERS.search(t) is not None
    symbols = [
        run
        for run in _NON_WORD.findall(t)
        if any(_is_operator(c) for c in run) and (code or run not in _PROSE_SYMBOLS)
    ]
    # superscripts, subscripts and vulgar fractions are word characters, so they sit inside tokens
    # ("3²"); they are listed on their own as well so "3²" vs "3^2" reads as a symbol difference
    symbols += [c for c in t if unicodedata.category(c) == "No"]
    symbols += ["-"] * len(_SIGN.findall(t))  # "-5" and "5" are different numbers
    return _Text(
        tokens=tuple(tokens),
        spellings={k: frozenset(v) for k, v in spellings.items()},
        symbols=tuple(sorted(symbols)),
        code=code,
        indents=tuple(line[: len(line) - len(line.lstrip())] for line in t.splitlines() if line.strip()),
    )


def tokens(text: str) -> tuple[str, ...]:
    """The casefolded words of a text as the guard compares them (NFC, never NFKC)."""
    return _analyse(text).tokens


def _is_operator(c: str) -> bool:
    return c in _OPERATORS or (unicodedata.category(c) in _OPERATOR_CATEGORIES and c != "`")


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    for suffix in ("es", "s"):
        if len(word) > 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _is_number(word: str) -> bool:
    return any(c.isdigit() for c in word) or word in NUMBER_WORDS or word[:1] in "£$€"


def _is_identifier(word: str) -> bool:
    """Spelled like a code identifier: snake_case or an inner case change (camelCase, iPhone)."""
    if "_" in word.strip("_") and any(c.isalpha() for c in word):
        return True
    return any(a.islower() and b.isupper() for a, b in zip(word, word[1:], strict=False))


def _directions(toks: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for i, w in enumerate(toks):
        if w in DIRECTIONAL:
            nxt = next((x for x in toks[i + 1 :] if x not in FILLERS), None)
            if nxt:
                out.append((w, nxt))
    return sorted(out)


def _number_form_differs(only_a: set[str], only_b: set[str]) -> bool:
    """A quantity written in digits on one side and in words on the other ("3" / "three")."""
    digits_a = any(any(c.isdigit() for c in w) for w in only_a)
    digits_b = any(any(c.isdigit() for c in w) for w in only_b)
    words_a, words_b = bool(only_a & CARDINAL_WORDS), bool(only_b & CARDINAL_WORDS)
    return (digits_a and words_b) or (words_a and digits_b)


def _one_word_flip(ta: tuple[str, ...], tb: tuple[str, ...]) -> bool:
    """The same words but one, exchanged for its counterpart in FLIPS, in the same place."""
    if len(ta) != len(tb):
        return False
    diff = [(x, y) for x, y in zip(ta, tb, strict=True) if x != y]
    return len(diff) == 1 and diff[0][1] in FLIPS.get(diff[0][0], ())


def _transposed(ta: tuple[str, ...], tb: tuple[str, ...]) -> bool:
    """Two content words that changed places, everything else where it was: "Does the Sun orbit
    the Earth?" / "Does the Earth orbit the Sun?", "Did Germany invade Poland?" / "Did Poland
    invade Germany?". A rewording that moves a phrase ("In 2 days can I get a refund?") moves
    every word between, so it is not this."""
    if len(ta) != len(tb):
        return False
    diff = [i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y]
    if len(diff) != 2:
        return False
    i, j = diff
    return ta[i] == tb[j] and ta[j] == tb[i] and ta[i] not in FILLERS and ta[j] not in FILLERS


def _case_differs(a: _Text, b: _Text) -> bool:
    """A word both texts use, spelled in different letter case where case is significant."""
    for word in a.spellings.keys() & b.spellings.keys():
        sa, sb = a.spellings[word], b.spellings[word]
        if sa == sb:
            continue
        if a.code or b.code or any(_is_identifier(s) for s in sa | sb):
            return True
    return False


def trap_guard(query: str, candidate: str) -> str | None:
    """Why two similar questions must not share an answer (None when no trap is seen).

    Reasons: ``negation``, ``number`` (a differing quantity or date, or one written as digits on
    one side and as words on the other), ``opposite``, ``substitution`` (one or two content words
    swapped in an otherwise equal question), ``swap`` (from/to reversed), ``order`` (the same words
    with their numbers or an operator's operands in another order: ``2^10`` vs ``10^2``, ``a/b`` vs
    ``b/a``; or two content words that changed places: ``Does the Sun orbit the Earth?`` vs ``Does the
    Earth orbit the Sun?``), ``flip`` (one function word exchanged for its counterpart: from/to,
    and/or, this/next, is/was, my/your), ``symbol`` (a differing sign,
    operator or superscript: ``>=`` vs ``>``, ``3²`` vs ``32``) and ``case`` (an identifier or code
    whose letter case differs: ``myVar`` vs ``myvar``, ``print(x)`` vs ``PRINT(x)``) and
    ``indentation`` (code whose lines are indented differently). They cost some
    true paraphrases (a reworded question that happens to mention a number), but those become
    misses, never wrong answers.
    """
    a, b = _analyse(query), _analyse(candidate)
    ta, tb = a.tokens, b.tokens
    sa, sb = {_stem(w) for w in ta}, {_stem(w) for w in tb}
    only_a, only_b = sa - sb, sb - sa
    rest_a, rest_b = sa - NEGATIONS - FILLERS, sb - NEGATIONS - FILLERS
    overlap = len(rest_a & rest_b) / max(len(rest_a | rest_b), 1)
    # negation matters when the rest of the question is the same; a rewording may add a "not"
    if (
        overlap >= NEGATION_OVERLAP
        and sum(w in NEGATIONS for w in ta) % 2 != sum(w in NEGATIONS for w in tb) % 2
    ):
        return "negation"
    # a number or date that differs matters in a minimal edit; a rewording that mentions one
    # (while sharing little else) is left to the similarity and the vote
    if overlap >= NUMBER_OVERLAP and any(_is_number(w) for w in only_a | only_b):
        return "number"
    for w in only_a:
        for v in only_b:
            if v in OPPOSITES.get(w, ()):
                return "opposite"
            if any(w == p + v or v == p + w for p in ANTONYM_PREFIXES):
                return "opposite"
    content_a, content_b = only_a - FILLERS, only_b - FILLERS
    if content_a and content_b and len(content_a) <= 2 and len(content_b) <= 2 and len(sa & sb) >= 3:
        return "substitution"
    if sa == sb and ta != tb:
        da, db = _directions(ta), _directions(tb)
        if da and db and da != db:
            return "swap"
        # the same words in another order, where order is meaning: the numbers ("2^10" / "10^2",
        # "5 minus 3" / "3 minus 5", "log base 2 of 8" / "log base 8 of 2") or the operands
        # around an operator ("a/b" / "b/a", "x > y" / "y > x")
        reordered = sorted(ta) == sorted(tb)  # a permutation, not a word added or dropped
        if reordered and ([w for w in ta if _is_number(w)] != [w for w in tb if _is_number(w)] or a.symbols):
            return "order"
        # or the subject and the object of the question ("Is Paris the capital of France?")
        if _transposed(ta, tb):
            return "order"
    if _one_word_flip(ta, tb):
        return "flip"
    if a.symbols != b.symbols:
        return "symbol"
    # a question that is only filler words and a number ("what is 32?" / "what is 33?") has no
    # content to overlap, so the overlap rule above cannot see its number change
    numbers_a = {w for w in only_a if _is_number(w)}
    numbers_b = {w for w in only_b if _is_number(w)}
    if numbers_a and numbers_b and rest_a - numbers_a == rest_b - numbers_b:
        return "number"
    if _number_form_differs(only_a, only_b):
        return "number"
    if _case_differs(a, b):
        return "case"
    # in code, indentation is syntax: it decides which block a line belongs to (Python, YAML)
    if (a.code or b.code) and a.indents != b.indents:
        return "indentation"
    return None
