from caches.prompts import build_messages, last_user_text, message_text, shared_prefix_text


def test_shared_content_goes_first_and_user_content_last() -> None:
    msgs = [
        {"role": "user", "content": "my account number is 1234"},
        {"role": "system", "content": "Use British spelling."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "what is my balance?"},
    ]
    built = build_messages("You are a bank assistant.", msgs)
    assert built[0] == {"role": "system", "content": "You are a bank assistant.\n\nUse British spelling."}
    assert [m["role"] for m in built[1:]] == ["user", "assistant", "user"]
    assert built[-1]["content"] == "what is my balance?"
    # no user text ever lands in the shared head
    assert "1234" not in built[0]["content"]


def test_same_system_prompt_gives_identical_prefix_for_different_users() -> None:
    a = build_messages("SYS", [{"role": "user", "content": "alice question"}])
    b = build_messages("SYS", [{"role": "user", "content": "bob question"}])
    assert a[0] == b[0]


def test_no_system_prompt_and_content_parts() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    assert build_messages("", msgs) == msgs
    # joined with a newline, as vLLM joins text parts (renderers/chat_utils.py): what the model reads
    assert message_text(msgs[0]) == "hello \nthere"
    assert last_user_text(msgs) == "hello \nthere"


def test_shared_prefix_excludes_only_last_user_turn() -> None:
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    prefix = shared_prefix_text(msgs)
    assert "q1" in prefix and "a1" in prefix and "q2" not in prefix
    assert shared_prefix_text(msgs[:1] + [{"role": "user", "content": "other"}]) == shared_prefix_text(msgs[:2])
