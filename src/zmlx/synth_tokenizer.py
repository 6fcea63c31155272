"""The synthetic checkpoints' tokenizer: byte-level BPE with exactly `vocab_size` ids, offline.

It carries a minimal chat template, so that `mlx_lm chat` and `apply_chat_template`
work on a synthetic checkpoint as on a real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0

# One line per message, then the assistant's turn when asked for; plain text only, so
# every character is in the byte-level vocabulary.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _tokenizer_vocab(vocab_size: int) -> dict[str, int]:
    from itertools import product

    from tokenizers import pre_tokenizers

    vocab = {EOS_TOKEN: EOS_ID}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    length = 1
    # Readable filler tokens: ' ab', ' ac', ... (\u0120 is ByteLevel's space).
    while len(vocab) < vocab_size:
        length += 1
        for chars in product(letters, repeat=length):
            if len(vocab) >= vocab_size:
                break
            vocab["\u0120" + "".join(chars)] = len(vocab)
    return vocab


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Save the tokenizer (with its chat template) into the directory `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=_tokenizer_vocab(vocab_size), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


_TOKENIZER_CACHE: dict[int, Path] = {}


def load_tokenizer_for(cfg: dict[str, Any]):
    """The tokenizer a written checkpoint would carry, loaded through mlx-lm."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    vocab = cfg["vocab_size"]
    if vocab not in _TOKENIZER_CACHE:
        path = Path(tempfile.mkdtemp(prefix="zmlx-tokenizer-"))
        write_tokenizer(path, vocab)
        _TOKENIZER_CACHE[vocab] = path
    return load_tokenizer(_TOKENIZER_CACHE[vocab], eos_token_ids=[cfg["eos_token_id"]])
