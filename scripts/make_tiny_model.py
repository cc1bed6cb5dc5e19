"""Build a tiny random Qwen2 chat model on disk, without downloading anything.

Run with the vLLM venv's interpreter (it has torch, transformers and
tokenizers)::

    python scripts/make_tiny_model.py DIR

The model is about one million random parameters (hidden size 128, 4 heads of
32: the CPU attention backend only takes head sizes 32, 64, 80, 96, 112, 128,
...), a byte-level BPE tokenizer trained on the text below, and a ChatML chat
template, so vLLM serves it like any Qwen2 instruct model. Its answers are
deterministic noise; it exists to exercise processes, ports and KV transfer.

Idempotent: DIR holds a stamp with a digest of this file and the library
versions; when it matches, nothing is rebuilt. The build goes to a sibling
temporary directory renamed into place, so DIR is never half written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

STAMP = ".pdsupervisord-model-stamp"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: Byte-level BPE merges learnt from this text; 256 byte symbols make every
#: string encodable, the merges only shorten common words.
CORPUS = """
You are a helpful assistant. What is the text in the illustration?
The prefill instance computes the prompt's key-value cache and hands it to the
decode instance, which generates the answer token by token. A supervisor starts
every engine, waits until it is healthy, restarts whatever dies and keeps the
proxy's membership current. Hello, world! The quick brown fox jumps over the
lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Tell me a story about a
small model that runs on two cores and never downloads anything.
"""

#: ChatML, as Qwen2 instruct models use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

VOCAB_TARGET = 640
MAX_POSITIONS = 4096
SEED = 20240601


def build_tokenizer() -> Tokenizer:
    """Train a small byte-level BPE tokenizer on :data:`CORPUS`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n") * 4, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> int:
    """Write the tokenizer files; return the vocabulary size."""
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def save_model(vocab_size: int, eos_id: int, pad_id: int, out: Path) -> None:
    """Write the config and random weights of a tiny Qwen2 causal LM."""
    config = transformers.Qwen2Config(
        vocab_size=-(-vocab_size // 64) * 64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        # Ten times the usual spread: with 0.02 the random logits are so flat
        # that greedy decoding repeats one token; with 0.2 every prompt gets
        # its own varied (meaningless) text, so answers can be compared.
        initializer_range=0.2,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    generation = {"eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def stamp_text() -> str:
    """What the model depends on: this file and the library versions."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    versions = f"transformers={transformers.__version__} torch={torch.__version__}"
    return f"{digest} {versions} tokenizers={tokenizers.__version__}\n"


def build(out: Path) -> None:
    """Build the model into ``out`` unless an identical build is there."""
    stamp = stamp_text()
    if (out / STAMP).is_file() and (out / STAMP).read_text() == stamp:
        print(f"make_tiny_model: model ready: {out}", file=sys.stderr)
        return

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = build_tokenizer()
        vocab_size = save_tokenizer(tokenizer, work)
        eos_id = tokenizer.token_to_id("<|im_end|>")
        pad_id = tokenizer.token_to_id("<|endoftext|>")
        save_model(vocab_size, eos_id, pad_id, work)
        (work / STAMP).write_text(stamp)
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"make_tiny_model: built {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="model directory to create")
    build(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
