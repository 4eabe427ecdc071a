"""A bigram "language model" behind the runtime interface, for fast statistical tests of the engine.

Its next-token distribution depends only on the previous token, so the exact joint distribution of the first
generated tokens is known in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class BigramSequence:
    def __init__(self, log_table: np.ndarray) -> None:
        self._log = log_table
        self.tokens: list[int] = []

    def next_logits(self, tokens: Sequence[int], n_out: int = 1) -> torch.Tensor:
        self.tokens = list(tokens)
        rows = [self._log[t] for t in tokens[len(tokens) - n_out :]]
        return torch.from_numpy(np.stack(rows))

    def rollback(self, length: int) -> None:
        del self.tokens[length:]

    def __len__(self) -> int:
        return len(self.tokens)


class BigramModel:
    dtype = "fp32"
    context_length = 1 << 20  # a bigram has no position limit; tests set a small one on an instance

    def __init__(self, table: np.ndarray, name: str = "bigram", eos: tuple[int, ...] = ()) -> None:
        self.table = table
        self.name = name
        self.vocab_size = table.shape[1]
        self.eos_token_ids = eos
        # float32 logits, as a real model emits; the float32 table is the ground truth
        self.log_table = np.log(np.maximum(table, 1e-30)).astype(np.float32)

    def encode(self, text: str) -> list[int]:
        return [int(c) % self.vocab_size for c in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)

    def new_sequence(self) -> BigramSequence:
        return BigramSequence(self.log_table)


def bigram_pair(vocab: int, seed: int, agreement: float | None = None) -> tuple[BigramModel, BigramModel]:
    """An unrelated draft by default; with `agreement` a peaked target and a draft mixed from it (high alpha)."""
    rng = np.random.default_rng(seed)
    if agreement is None:
        target = BigramModel(rng.dirichlet(np.ones(vocab), size=vocab), "target")
        draft = BigramModel(rng.dirichlet(np.full(vocab, 0.5), size=vocab), "draft")
        return target, draft
    table = rng.dirichlet(np.full(vocab, 0.2), size=vocab)
    noise = rng.dirichlet(np.ones(vocab), size=vocab)
    return BigramModel(table, "target"), BigramModel(agreement * table + (1 - agreement) * noise, "draft")


def cyclic_pair(vocab: int, target_step: float, draft_step: float) -> tuple[BigramModel, BigramModel]:
    """Both models mostly step to the next token (a -> a + 1 mod vocab); the draft is surer of it.

    Rounds often accept everything (so pipelining keeps its pre-drafted blocks) yet reject often enough, and
    the rows of neighbouring contexts differ sharply, so a proposal row paired with the wrong token shows.
    """

    def table(step: float) -> np.ndarray:
        out = np.full((vocab, vocab), (1 - step) / (vocab - 1))
        out[np.arange(vocab), (np.arange(vocab) + 1) % vocab] = step
        return out

    return BigramModel(table(target_step), "target"), BigramModel(table(draft_step), "draft")


# --- tiny random Llamas: a real transformer (KV cache, rollbacks) small enough for statistics -------------


def tiny_llama(seed: int, name: str | None = None):
    """A `tiny-random`-shaped Llama (same config and byte tokenizer) with weights drawn from `seed`.

    `load_model("tiny-random")` has one fixed seed; a second, differently seeded model makes a draft that
    really disagrees with it, without touching shared/models.
    """
    from transformers import LlamaForCausalLM

    from draftwire.shared.models.runtime import LoadedModel
    from draftwire.shared.models.tiny_random import build_tiny_random

    reference, tokenizer = build_tiny_random()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(reference.config)
    model.generation_config = reference.generation_config
    return LoadedModel(name or f"tiny-llama-{seed}", "fp32", model.to(torch.float32).eval(), tokenizer)


def blend(target, other, weight: float, name: str = "tiny-draft"):
    """A draft between two models: every weight is (1 - weight) * target + weight * other.

    weight 0 is the target itself, 1 the unrelated model; in between the agreement (acceptance) is tunable,
    which pipelining needs: a pre-drafted block is only kept after a round accepted everything.
    """
    import copy

    from draftwire.shared.models.runtime import LoadedModel

    model = copy.deepcopy(target.model)
    theirs = other.model.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.mul_(1 - weight).add_(theirs[key], alpha=weight)
    return LoadedModel(name, "fp32", model, target.tokenizer)


def save_hf_dir(model, path) -> None:
    """Write a tiny Llama as a Hugging Face dir that `load_model(path)` (and so the services) can load.

    The byte tokenizer is written as a `tokenizers` byte-level BPE without merges, laid out so that id i is
    byte i and BOS/EOS/PAD are 256/257/258: it encodes every text to the same ids as `ByteTokenizer`.
    """
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: _BYTE_OF[ch])
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert fast.convert_tokens_to_ids(specials) == [256, 257, 258]
    model.model.save_pretrained(path)
    fast.save_pretrained(path)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenization emits), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _bytes_to_unicode()


# --- two tokenizers: a draft that does not share the target's vocabulary (issue 13) -----------------------


def byte_level_tokenizer(pieces: Sequence[str], merges: Sequence[tuple[str, str]], specials: Sequence[str]):
    """A tiny byte-level BPE tokenizer (the SmolLM2 / Qwen family): id i is pieces[i] (printable ASCII), then
    the special tokens; `merges` decide how text is split. Other characters are not in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])


class TokenizedBigram(BigramModel):
    """A bigram over a real tokenizer's ids: what cross-tokenizer speculation needs (the bytes of each id)."""

    def __init__(self, table: np.ndarray, tokenizer, name: str, eos: tuple[int, ...]) -> None:
        super().__init__(table, name, eos)
        self.tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def cross_bigram_pair(seed: int, blur: float = 0.5, peak: float = 0.6) -> tuple[TokenizedBigram, TokenizedBigram]:
    """Target and draft bigrams whose tokenizers overlap only in part: "ab" and "cc" are one target token
    that the draft spells in pieces, "ca" and "bc" are draft tokens the target lacks, and the shared strings
    sit at different ids; both end with "</s>" (paired by content). The draft is mixed from the target's
    rows where it can express them (`blur`: how much noise is mixed in), so acceptance is well above zero and
    well below one; a small `peak` makes the target surer of its next token."""
    target_tok = byte_level_tokenizer(["a", "b", "ab", "c", "cc"], [("a", "b"), ("c", "c")], ["</s>"])
    draft_tok = byte_level_tokenizer(["b", "c", "a", "ca", "bc"], [("c", "a"), ("b", "c")], ["</s>"])
    rng = np.random.default_rng(seed)
    target = rng.dirichlet(np.full(6, peak), size=6)
    to_target = [1, 3, 0, None, None, 5]  # draft id -> target id of the same string
    draft = rng.dirichlet(np.ones(6), size=6)
    for d, t in enumerate(to_target):  # the draft's row after d: the target's row after d's string, blurred
        src = target[t] if t is not None else rng.dirichlet(np.ones(6))
        draft[d] = blur * draft[d] + (1 - blur) * np.array([src[t] if t is not None else 0.1 for t in to_target])
        draft[d] /= draft[d].sum()
    return (TokenizedBigram(target, target_tok, "cross-target", (5,)),
            TokenizedBigram(draft, draft_tok, "cross-draft", (5,)))


def retokenized_llama(model, name: str = "tiny-bpe-draft"):
    """`model` (a tiny byte-tokenizer Llama) under a byte-level BPE tokenizer: id i is byte 255 - i, "th" is
    id 256 and "</s>", "<s>", "<pad>" are 257-259. Its embedding and output rows are permuted to match, so it
    predicts the very bytes `model` predicts, in other ids: a near-perfect draft that shares no id meaning
    with its target (except where "th" is one token: a row that means nothing)."""
    import copy

    from draftwire.shared.models.runtime import LoadedModel

    by_byte = {b: ch for ch, b in _BYTE_OF.items()}
    pieces = [by_byte[255 - i] for i in range(256)] + ["th"]
    tok = byte_level_tokenizer(pieces, [("t", "h")], ["</s>", "<s>", "<pad>"])
    tok.bos_token, tok.pad_token = "<s>", "<pad>"
    perm = torch.tensor([255 - i for i in range(256)] + [259, 257, 256, 258])  # draft id -> the model's id
    net = copy.deepcopy(model.model)
    with torch.no_grad():
        net.get_input_embeddings().weight.copy_(model.model.get_input_embeddings().weight[perm])
        if not net.config.tie_word_embeddings:
            net.get_output_embeddings().weight.copy_(model.model.get_output_embeddings().weight[perm])
    net.generation_config.eos_token_id = net.config.eos_token_id = 257
    return LoadedModel(name, "fp32", net, tok)
