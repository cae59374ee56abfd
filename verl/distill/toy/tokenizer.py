"""Character-level tokenizer of the toy task, with a ChatML chat template.

Every character is one token (digits, ``+``, ``=``, space, newline, lower-case letters); the
three ChatML role names are single tokens too, so a rendered prompt is 14 tokens long. ChatML's
``<|im_end|>`` is the end-of-sequence token: verl's continuous-token builder for ``qwen2``
models requires it, and a response ends with it. Unknown characters map to ``<unk>``.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
TURN_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, TURN_START_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = "\n +=" + string.digits + string.ascii_lowercase
ROLE_TOKENS = ("system", "user", "assistant")

# No default system prompt: prompts stay short and every prompt has the same length.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_MAX_LENGTH = 64


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer; deterministic, so saving it twice gives identical files."""
    # Vocabulary entries are written in GPT-2's byte-level alphabet (space "Ġ", newline "Ċ"): the
    # model folders say `qwen2`, and transformers then loads them with Qwen2Tokenizer, which
    # re-applies a byte-level pre-tokenizer. Plain characters would lose the newline there, and
    # verl's agent loop refuses a ChatML tokenizer whose "\n" is not exactly one token.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    encoded = ["".join(piece for piece, _ in byte_level.pre_tokenize_str(char)) for char in CHARACTERS]
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *encoded))}
    # BPE without merges splits text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.add_tokens(list(ROLE_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[TURN_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
    )
