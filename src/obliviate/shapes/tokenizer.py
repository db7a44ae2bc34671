"""Build a CLIP tokenizer for the shapes world from our own vocabulary (no download).

The files are CLIP's format (`vocab.json`, `merges.txt`), so `CLIPTokenizer` loads them like
any Stable Diffusion tokenizer. The merges come from a small byte-pair-encoding trainer run
on the world's word list until every word is a single token; every byte keeps a token of
its own, so any text still tokenizes (unknown words fall back to pieces).
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer

from . import vocab

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def train_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn each of `words` into exactly one token.

    Standard BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair
    itself, so the result is deterministic) until every word is a single symbol.
    """
    segmented = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(
            (syms[i], syms[i + 1]) for syms in segmented.values() for i in range(len(syms) - 1)
        )
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, syms in segmented.items():
            out, i = [], 0
            while i < len(syms):
                if i < len(syms) - 1 and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            segmented[w] = out


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer for `words` (default: the world's); `save_pretrained` writes its files."""
    words = words if words is not None else vocab.all_words()
    merges = train_bpe(words)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    tokenizer = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        model_max_length=MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    return tokenizer
