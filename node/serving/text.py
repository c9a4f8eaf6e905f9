"""Text <-> token ids for the serving API: one small interface, two implementations.

    codec = ByteText()                          # the byte-level LMs of node/ml/models.py (gpt2, llama)
    codec = HFText.from_folder(minilm_path())   # a tokenizer folder on disk (tokenizer.json ...), never the hub
    ids = codec.encode("hello")                 # list[int], each in [0, codec.vocab_size)
    text = codec.decode(ids)

The HTTP layer (node/serving/http_api.py) checks every id a client sends against ``vocab_size`` before it reaches a
model, so an out-of-range id is a 400 and never an index error inside an embedding table.
"""

from __future__ import annotations

import pathlib
from typing import Any, Protocol

from node.ml.models import BYTE_VOCAB


class TextCodec(Protocol):
    """What a backend's ``text`` is: how a client's strings become the model's token ids and back."""

    @property
    def vocab_size(self) -> int:
        """Ids in [0, vocab_size) are valid input (the HTTP layer refuses the rest)."""
        ...

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """The ids of ``text``; ``special_tokens=False`` leaves out what a tokenizer adds around a whole input
        ([CLS]/[SEP], BOS), as a stop string is matched inside generated text, not as an input of its own."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class ByteText:
    """The byte vocabulary of node/ml/models.py and node/ml/datasets.py: token id = the byte's value (no offset:
    the pystdlib-bytes corpus feeds ``np.frombuffer(data, uint8)`` straight to the model), BYTE_VOCAB = 256 ids, and
    id 0 (NUL, which never occurs in source text) doubles as padding. Text is UTF-8. Decoding replaces a byte sequence
    that is not UTF-8 (a model may stop mid-character) with U+FFFD, as Hugging Face tokenizers do, so a reply is
    always valid JSON text.

    ``vocab_size`` below 256 is for a model trained on fewer ids (a 7-bit ASCII model: 128); encoding a character
    outside it is then a ValueError naming it."""

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= BYTE_VOCAB:
            raise ValueError(f"ByteText: vocab_size must be an integer in [1, {BYTE_VOCAB}], got {vocab_size!r}")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))  # byte-level: no special tokens to add either way
        if self._vocab_size < BYTE_VOCAB:
            bad = next((i for i in ids if i >= self._vocab_size), None)
            if bad is not None:
                raise ValueError(f"text has byte 0x{bad:02x}, outside this model's {self._vocab_size} byte ids")
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFText:
    """A transformers tokenizer (wrapped, not subclassed: its API is large and changes between releases; this uses
    ``encode``/``decode``/``len`` only). Decoding skips special tokens, as OpenAI's replies carry none."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path) -> HFText:
        """The tokenizer saved in ``folder`` (tokenizer.json or vocab files); local_files_only, so a missing file is
        a ValueError here and never a download."""
        from transformers import AutoTokenizer

        from node.ml.models import quiet_transformers

        path = pathlib.Path(folder)
        if not path.is_dir():
            raise ValueError(f"tokenizer folder {path} does not exist")
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except OSError as e:  # transformers' "can't load tokenizer" for a folder without one
            raise ValueError(f"no tokenizer in {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # added tokens included (tokenizer.vocab_size leaves them out)

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special_tokens))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
