"""A character-level tokenizer saved as a standard Hugging Face fast tokenizer.

One token per character keeps digits separate, which a tiny model needs to learn arithmetic, and a
``PreTrainedTokenizerFast`` directory loads anywhere with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` over printable ASCII plus newline; anything else maps to <unk>."""
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with an empty merge list splits text into single characters; no pre-tokenizer keeps spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    # Every sequence starts with <s>, in training and at inference alike.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


assert len(set(CHARACTERS)) == len(CHARACTERS) and set(string.digits) <= set(CHARACTERS)
