"""Multi-turn pairs the semantic cache never saw: what it serves and what it merges, by kind.

``python -m benchmarks.conversation_pairs [--pairs JSONL] [--out JSON]``

``../shared/data/fow_cache/conversation_pairs.jsonl`` holds 240 pairs of conversations (``a``,
``b``: message lists ending in a user question) with ``same_answer`` and a ``subtype``: 120
should-hit pairs (the same facts reworded, extra chatter, irrelevant history) and 120 traps ("cancel
it" after a streaming plan vs after a gym membership, a changed detail, a flipped intent). No
threshold, constant or guard of the project was tuned on this file, so it is held out.

Each pair alone: ``a`` is stored, ``b`` asked. Three rules, all with the shipped threshold and the
trap guard (:class:`caches.semantic.decision.StaticPolicy`):

- **app**: the app's own identity (:class:`caches.chat.RequestIdentity`, with the app's system
  prompt in front as the Chat route sends it): a hit needs the same scope, i.e. the same earlier
  turns byte for byte, then the last questions compared;
- **last question only**: what a cache that ignores the history would do (the scope dropped);
- **whole conversation**: the user turns joined and compared as one text (a design the app does
  not use: how much more it would serve, and how many traps it would merge).

Writes ``benchmarks/results/conversation_pairs.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from caches.calibrate import load_threshold
from caches.chat import EncoderIdentity, ModelIdentity, RequestIdentity
from caches.encoder import ENCODER_NAME, ENCODER_VERSION, encode
from caches.prompts import build_messages, message_text
from caches.semantic.decision import Candidate, StaticPolicy
from caches.semantic.guard import trap_guard

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAIRS = REPO_ROOT.parent / "shared" / "data" / "fow_cache" / "conversation_pairs.jsonl"
RESULTS = REPO_ROOT / "benchmarks" / "results"
RULES = ("app", "last question only", "whole conversation")


def read_pairs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if r.get("a") and r.get("b") and isinstance(r.get("same_answer"), bool)]


def _identity(messages: list[dict[str, Any]], system_prompt: str) -> RequestIdentity:
    # As deployments/chat.py builds it: the engine's request (system prompt in front), greedy.
    request = {"model": "m", "messages": build_messages(system_prompt, messages), "temperature": 0}
    return RequestIdentity.build(request, tenant="bench", model=ModelIdentity(name="m", fingerprint="0" * 16),
                                 version="v1", encoder=EncoderIdentity(name=ENCODER_NAME, version=ENCODER_VERSION))


def _user_turns(messages: list[dict[str, Any]]) -> str:
    return "\n".join(message_text(m) for m in messages if m.get("role") == "user")


def evaluate(rows: list[dict[str, Any]], threshold: float, system_prompt: str) -> dict[str, Any]:
    """Per rule and (same_answer, subtype): pairs, and pairs the rule answers from ``a``'s entry."""
    rule = StaticPolicy(threshold, guard=trap_guard)
    last = {side: [message_text(r[side][-1]) for r in rows] for side in "ab"}
    whole = {side: [_user_turns(r[side]) for r in rows] for side in "ab"}
    last_a, last_b, whole_a, whole_b = (encode(texts) for texts in (last["a"], last["b"], whole["a"], whole["b"]))

    def hit(sim: float, stored: str, asked: str) -> bool:
        candidate = Candidate(entry_id=1, similarity=sim, query=stored, response="")
        return rule.decide([candidate], asked, threshold).hit is not None

    pairs: Counter[str] = Counter()
    served: dict[str, Counter[str]] = {name: Counter() for name in RULES}
    merged_traps: dict[str, list[str]] = {name: [] for name in RULES}
    for i, row in enumerate(rows):
        kind = f"{'should-hit' if row['same_answer'] else 'trap'}/{row['subtype']}"
        pairs[kind] += 1
        same_scope = _identity(row["a"], system_prompt).semantic_scope == _identity(row["b"], system_prompt).semantic_scope
        last_hit = hit(float(np.dot(last_a[i], last_b[i])), last["a"][i], last["b"][i])
        outcomes = {
            "app": same_scope and last_hit,
            "last question only": last_hit,
            "whole conversation": hit(float(np.dot(whole_a[i], whole_b[i])), whole["a"][i], whole["b"][i]),
        }
        for name, answered in outcomes.items():
            served[name][kind] += answered
            if answered and not row["same_answer"]:
                merged_traps[name].append(row["id"])
    out: dict[str, Any] = {"pairs": dict(sorted(pairs.items()))}
    n_hit = sum(v for k, v in pairs.items() if k.startswith("should-hit"))
    n_trap = sum(v for k, v in pairs.items() if k.startswith("trap"))
    for name in RULES:
        good = sum(v for k, v in served[name].items() if k.startswith("should-hit"))
        bad = sum(v for k, v in served[name].items() if k.startswith("trap"))
        out[name] = {
            "should_hit_served": good, "should_hit_pairs": n_hit, "traps_merged": bad, "trap_pairs": n_trap,
            "precision": round(good / (good + bad), 4) if good + bad else None,
            "by_kind": dict(sorted(served[name].items())), "merged_trap_ids": merged_traps[name],
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--threshold", type=float, default=None, help="default: the calibrated threshold")
    parser.add_argument("--out", type=Path, default=RESULTS / "conversation_pairs.json")
    args = parser.parse_args(argv)
    from deployments.config import LLMSettings

    threshold = args.threshold if args.threshold is not None else load_threshold()
    result = {
        "pairs_file": str(Path("..") / args.pairs.resolve().relative_to(REPO_ROOT.parent))
        if args.pairs.resolve().is_relative_to(REPO_ROOT.parent) else str(args.pairs),
        "role": "held out: nothing of the project was tuned or tested on these pairs before",
        "threshold": threshold,
        **evaluate(read_pairs(args.pairs), threshold, LLMSettings().system_prompt),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in RULES:
        r = result[name]
        print(f"{name:20s} should-hit served {r['should_hit_served']}/{r['should_hit_pairs']}  "
              f"traps merged {r['traps_merged']}/{r['trap_pairs']}  precision {r['precision']}")
    return result


if __name__ == "__main__":
    main()
