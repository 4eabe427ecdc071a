"""A byte-level tokenizer for the tiny test model: ids 0..255 are the UTF-8 bytes, then BOS/EOS/PAD.

It needs no files and is exactly invertible for any text, which is all the tests need; it offers the subset
of the Hugging Face tokenizer interface that the runtime uses (`encode`, `decode`, special ids, `len`).
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def __len__(self) -> int:
        return 259

    @property
    def all_special_ids(self) -> list[int]:
        return [self.bos_token_id, self.eos_token_id, self.pad_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """BOS (like a Llama tokenizer) then one id per UTF-8 byte."""
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text; special ids are dropped or spelled out; ids past the vocabulary are dropped."""
        out = bytearray()
        for token in ids:
            if 0 <= token < 256:
                out.append(token)
            elif not skip_special_tokens and token in self.all_special_ids:
                out += {256: b"<s>", 257: b"</s>", 258: b"<pad>"}[token]
        return out.decode("utf-8", errors="replace")
