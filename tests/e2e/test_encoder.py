"""The Encoder encodes off its replica's event loop: a cheap call is answered while a big
`/v1/embeddings` batch is being encoded (deployments/encoder.py)."""

from __future__ import annotations

import threading
import time
import uuid

import httpx

# The most inputs a request may carry (deployments/schemas.py), unique (the embedding cache must
# not answer them) and near the encoder's 256-token window each, under the 256 KiB body limit:
# seconds of encoding on a CPU, far longer than a model card's round trip.
BIG_BATCH = 256
WORDS_PER_TEXT = 110
WORDS = ["cache", "tier", "replica", "encoder", "vector", "redis", "rocksdb", "feast", "batch", "latency",
         "tenant", "event", "loop", "thread", "promotion", "demotion", "generation", "budget"]


def _texts(n: int) -> list[str]:
    tag = uuid.uuid4().hex
    return [f"{tag} {i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(WORDS_PER_TEXT)) for i in range(n)]


def test_a_cheap_call_is_answered_while_a_big_batch_encodes(client: httpx.Client, app_url: str) -> None:
    texts = _texts(BIG_BATCH)
    done = threading.Event()
    result: dict[str, httpx.Response] = {}

    def big() -> None:
        with httpx.Client(base_url=app_url, timeout=300) as own:
            result["big"] = own.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})
        done.set()

    worker = threading.Thread(target=big, daemon=True)
    worker.start()
    time.sleep(1.0)  # the batch has reached the Encoder and is encoding
    assert not done.is_set(), "the big batch finished within a second: make it bigger for this test to mean anything"
    # /v1/models asks the Encoder replica for `info`: with encoding on the event loop it would
    # wait for the whole batch.
    models = client.get("/v1/models")
    answered_during_batch = not done.is_set()
    assert models.status_code == 200 and len(models.json()["data"]) == 2
    worker.join(300)
    assert answered_during_batch, "the Encoder answered `info` only after the big batch: encoding blocks its loop"
    body = result["big"].json()
    assert result["big"].status_code == 200, result["big"].text
    assert len(body["data"]) == BIG_BATCH and [d["index"] for d in body["data"]] == list(range(BIG_BATCH))
    # The same texts again: every vector from the embedding cache, identical to the first ones.
    again = client.post("/v1/embeddings", json={"input": texts[:50], "encoding_format": "float"}).json()
    assert [d["embedding"] for d in again["data"]] == [d["embedding"] for d in body["data"][:50]]
