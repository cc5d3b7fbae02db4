"""Prompt layout for the KV / prefix cache: shared first, user-specific last.

vLLM's automatic prefix caching reuses KV blocks only for an identical token prefix, and only for
full blocks. So the order of a prompt decides its cache hit rate: the deployment's system prompt
(identical for every request) goes first, then shared context (request-level system messages,
same for every user of an app), and only then the conversation. Anything per-user placed in front
would make every prompt's first block unique and turn the cache off for everyone.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


def message_text(message: Message) -> str:
    """Text of a message whose content is a string or a list of OpenAI content parts, the parts
    joined with a newline as vLLM joins them for a text-only chat template ("What is" and "2+2"
    are "What is\n2+2", not "What is2+2", for the encoder and the trap guard too)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))


def build_messages(deployment_system_prompt: str, messages: list[Message]) -> list[Message]:
    """One leading system message (deployment prompt, then the request's system messages in
    order), followed by the non-system turns in their original order."""
    shared = [deployment_system_prompt] if deployment_system_prompt else []
    shared += [message_text(m) for m in messages if m.get("role") in ("system", "developer")]
    turns = [m for m in messages if m.get("role") not in ("system", "developer")]
    head = [{"role": "system", "content": "\n\n".join(s for s in shared if s)}] if shared else []
    return head + turns


def last_user_text(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def shared_prefix_text(messages: list[Message]) -> str:
    """Everything but the last user turn: what must match exactly for a semantic hit."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return "\u241e".join(
        f"{m.get('role')}:{message_text(m)}" for i, m in enumerate(messages) if i != last_user
    )
