"""The lexical trap guard: why two similar questions must not share an answer.

Sentence embeddings score minimal edits near 1.0: "lock my card" / "unlock my card", "at 2pm" /
"at 2am" land at cosine 0.8 to 0.99, above any useful threshold (see
``configs/semantic_calibration.png``). :func:`trap_guard` is a second-stage check on the nearest
candidate that catches such edits with lexical rules. A rule that fires costs at most a miss (the
model answers), never a wrong answer, so the rules lean towards firing.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

TOKEN_CACHE_SIZE = 65_536  # tokenised texts kept for the guard (a query is checked up to 3 times)


def _words(text: str) -> list[str]:
    return text.split()


_TOKEN = re.compile(r"[a-z0-9£$€%]+(?:'[a-z]+)?")
NEGATIONS = frozenset(
    _words(
        "not no never none nothing nobody nowhere neither nor without cannot non dont doesnt didnt isnt "
        "arent wasnt werent wont wouldnt cant couldnt shouldnt hasnt havent hadnt mustnt neednt aint"
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
OPPOSITES: dict[str, set[str]] = {}
for _pair in _OPPOSITE_PAIRS:
    _a, _b = _pair.split("-")
    OPPOSITES.setdefault(_a, set()).add(_b)
    OPPOSITES.setdefault(_b, set()).add(_a)
_ANTONYM_PREFIXES = ("un", "in", "im", "dis", "non", "ir", "il", "de")
# words whose presence or absence does not change a question (greetings, function words)
FILLERS = frozenset(
    _words(
        "hi hello hey please pls thanks thank you okay ok so um uh well just team there the a an my me i "
        "im is are do does can could would will to of for and or what whats how it its that this be in "
        "on at with your we our us any"
    )
)
NUMBER_OVERLAP = 0.5  # content-word Jaccard above which a differing number is a trap
_DIRECTIONAL = frozenset(_words("from to into than vs versus between over instead"))


@lru_cache(maxsize=TOKEN_CACHE_SIZE)
def tokens(text: str) -> tuple[str, ...]:
    """The casefolded words of a text as the guard compares them."""
    t = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    return tuple(w.replace("'", "") for w in _TOKEN.findall(t))


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    for suffix in ("es", "s"):
        if len(word) > 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _is_number(word: str) -> bool:
    return any(c.isdigit() for c in word) or word in NUMBER_WORDS or word[:1] in "£$€"


def _directions(tokens: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for i, w in enumerate(tokens):
        if w in _DIRECTIONAL:
            nxt = next((x for x in tokens[i + 1 :] if x not in FILLERS), None)
            if nxt:
                out.append((w, nxt))
    return sorted(out)


def trap_guard(query: str, candidate: str) -> str | None:
    """Why two similar questions must not share an answer (None when no trap is seen).

    A second-stage check on the nearest candidate. Sentence embeddings put "lock my card" and
    "unlock my card", or "at 2pm" and "at 2am", at cosine 0.8 to 0.99, above any useful threshold;
    these lexical rules catch such minimal edits. They cost some true paraphrases (a reworded
    question that happens to mention a number) but those become misses, never wrong answers.
    """
    ta, tb = tokens(query), tokens(candidate)
    sa, sb = {_stem(w) for w in ta}, {_stem(w) for w in tb}
    only_a, only_b = sa - sb, sb - sa
    rest_a, rest_b = sa - NEGATIONS - FILLERS, sb - NEGATIONS - FILLERS
    overlap = len(rest_a & rest_b) / max(len(rest_a | rest_b), 1)
    # negation matters when the rest of the question is the same; a rewording may add a "not"
    if overlap >= 0.5 and sum(w in NEGATIONS for w in ta) % 2 != sum(w in NEGATIONS for w in tb) % 2:
        return "negation"
    # a number or date that differs matters in a minimal edit; a rewording that mentions one
    # (while sharing little else) is left to the similarity and the vote
    if overlap >= NUMBER_OVERLAP and any(_is_number(w) for w in only_a | only_b):
        return "number"
    for w in only_a:
        for v in only_b:
            if v in OPPOSITES.get(w, ()):
                return "opposite"
            if any(w == p + v or v == p + w for p in _ANTONYM_PREFIXES):
                return "opposite"
    content_a, content_b = only_a - FILLERS, only_b - FILLERS
    if content_a and content_b and len(content_a) <= 2 and len(content_b) <= 2 and len(sa & sb) >= 3:
        return "substitution"
    if sa == sb and ta != tb:
        da, db = _directions(ta), _directions(tb)
        if da and db and da != db:
            return "swap"
    return None
