"""Text → token ids for the text encoders: GLIDE's BPE, CLIP's BPE and trainable sentencepiece.

All tokenizers share one interface (`Tokenizer`): `encode`, `decode`, `n_vocab`, `pad_token`,
`pad_and_mask(ids, ctx)` and `tokenize_batch(texts, ctx)`. The GLIDE text transformer takes
`(tokens, mask)` with the end token as padding; the noised CLIP's text encoder takes
`(tokens, text_len)` from `ClipBPETokenizer.padded_and_len`.

The two BPE vocabularies are not shipped with the project: they are read from `vocab_dir` when
given, else from `cache_dir()/vocab`, downloaded from openai/glide-text2im on first use and checked
against pinned SHA256 hashes. A model that only ever reads a small domain (the bundled demo CLIP)
can instead ship a subset of CLIP's merges with their original ids (`ClipBPETokenizer.from_table`),
which gives the full vocabulary's ids for the words the subset was built for and needs no download.

The reference splits words with the `regex` package (`\\p{L}`, `\\p{N}`); here the same patterns
are written for the standard `re` module with character classes built from `unicodedata`. The two
agree on every code point that the running Python's Unicode database knows (checked exhaustively
against `regex` in the tests when it is installed). The one known difference: letters and digits
assigned in a newer Unicode version than Python's database (14.0 for Python 3.11; `regex` ships
its own, newer tables) are symbols here, so prompts with such characters can split differently.

CLIP's cleaning uses `ftfy` in the reference; `clip_clean` reproduces its deterministic repairs
but not its mojibake detection (see there).
"""

from __future__ import annotations

import abc
import gzip
import html
import io
import json
import os
import re
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from glide_jax import download

__all__ = [
    "Tokenizer",
    "GlideBPETokenizer",
    "ClipBPETokenizer",
    "SentencePieceTokenizer",
    "clip_clean",
    "CLIP_TABLE_FORMAT",
    "VOCAB_URL",
    "VOCAB_SHA256",
    "vocab_file",
]

VOCAB_URL = "https://raw.githubusercontent.com/openai/glide-text2im/main/glide_text2im/tokenizer/{name}"
VOCAB_SHA256 = {
    "encoder.json.gz": "4debc1cf25180021b07744bc9f4488d53c7bf112c8ce5de8097c6a7518f4ec7c",
    "vocab.bpe.gz": "ce239dd5a898827423fee00e3f7ab37de7900f247f2ba360753d860e8a46524d",
    "bpe_simple_vocab_16e6.txt.gz": "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
}


# --------------------------------------------------------------------------------------------
# Shared interface


class Tokenizer(abc.ABC):
    """Common interface of the tokenizers; padding follows GLIDE (pad token + boolean mask)."""

    @property
    @abc.abstractmethod
    def n_vocab(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_token(self) -> int:
        """Id written into padded positions (the mask is False there)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def pad_and_mask(self, ids: Sequence[int], ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """Truncate `ids` to `ctx` and right-pad with `pad_token`.

        Returns `tokens` int32[ctx] and `mask` bool[ctx], True on real tokens. Truncation happened
        iff `len(ids) > ctx`; `tokenize_batch(..., return_truncated=True)` reports it per prompt.
        """
        _check_ctx(ctx)
        ids = list(ids)[:ctx]
        tokens = np.full((ctx,), self.pad_token, dtype=np.int32)
        tokens[: len(ids)] = ids
        mask = np.zeros((ctx,), dtype=np.bool_)
        mask[: len(ids)] = True
        return tokens, mask

    def tokenize_batch(
        self, texts: Sequence[str], ctx: int, *, return_truncated: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Encode and pad each text: `tokens` int32[B, ctx], `mask` bool[B, ctx].

        With `return_truncated=True` also returns `truncated` bool[B], True where a prompt had more
        than `ctx` tokens and lost its tail (so a caller can warn).
        """
        _check_texts(texts)
        _check_ctx(ctx)
        encoded = [self.encode(t) for t in texts]
        tokens = np.empty((len(texts), ctx), dtype=np.int32)
        mask = np.empty((len(texts), ctx), dtype=np.bool_)
        for i, ids in enumerate(encoded):
            tokens[i], mask[i] = self.pad_and_mask(ids, ctx)
        if return_truncated:
            return tokens, mask, np.array([len(ids) > ctx for ids in encoded], dtype=np.bool_)
        return tokens, mask


def _check_ctx(ctx: int) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 1:
        raise ValueError(f"ctx must be a positive integer, got {ctx!r}")


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("tokenize_batch expects a sequence of strings, got a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")


# --------------------------------------------------------------------------------------------
# Vocab files


def vocab_file(
    name: str, vocab_dir: str | os.PathLike | None = None, *, offline: bool | None = None
) -> Path:
    """Path of the reference vocab file `name`, verified against its pinned SHA256.

    With `vocab_dir` the file must already be there. Without it, the file is taken from
    `cache_dir()/vocab`, downloading it from openai/glide-text2im when missing (unless offline).
    """
    if name not in VOCAB_SHA256:
        raise ValueError(f"unknown vocab file {name!r}; known: {sorted(VOCAB_SHA256)}")
    url = VOCAB_URL.format(name=name)
    if vocab_dir is None:
        return download.fetch(
            url, download.cache_dir() / "vocab" / name, sha256=VOCAB_SHA256[name], offline=offline
        )
    path = Path(vocab_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"vocab file {name} not found in vocab_dir {vocab_dir}; download it from {url} "
            f"into that folder, or leave vocab_dir unset to use the cache "
            f"({download.cache_dir() / 'vocab'})"
        )
    actual = download.sha256_file(path)
    if actual != VOCAB_SHA256[name]:
        raise ValueError(
            f"vocab file {path} has sha256 {actual}, expected {VOCAB_SHA256[name]}: it is not the "
            f"reference's {name} (re-download it from {url})"
        )
    return path


def _read_gzip_text(path: Path) -> str:
    try:
        with gzip.open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read vocab file {path} as gzipped UTF-8 text: {e}") from e


# --------------------------------------------------------------------------------------------
# Unicode classes for the standard `re` module


@lru_cache(maxsize=None)
def _unicode_classes() -> tuple[str, str, str, str]:
    """Bodies of `[...]` classes: letters (\\p{L}), numbers (\\p{N}), whitespace, case-only.

    The whitespace class is the Unicode White_Space set that `regex` uses for `\\s`; the standard
    `re` module's `\\s` also matches the separators U+001C..U+001F, which the reference does not
    treat as whitespace, so `\\s` is never used directly.

    The last class holds the few non-letters whose case variant is a letter or number (U+0345,
    which uppercases to Greek iota). Under `regex.IGNORECASE` the reference's class
    `[^\\s\\p{L}\\p{N}]` rejects them while `[\\p{L}]` does not accept them, so CLIP drops them.
    """
    def letter_or_number(ch: str) -> bool:
        return unicodedata.category(ch)[0] in ("L", "N")

    members: dict[str, set[int]] = {"L": set(), "N": set(), "S": set(), "X": set()}
    for cp in range(0x110000):
        ch = chr(cp)
        category = unicodedata.category(ch)
        if category in ("Cn", "Co", "Cs"):
            continue  # unassigned, private use, surrogates: in none of the classes, no case
        major = category[0]
        if major in ("L", "N"):
            members[major].add(cp)
        elif ch.isspace() and not 0x1C <= cp <= 0x1F:
            members["S"].add(cp)
        for v in (ch.lower(), ch.upper(), ch.casefold(), ch.title()):
            if v != ch and len(v) == 1 and letter_or_number(ch) != letter_or_number(v):
                members["X"].add(ord(v) if letter_or_number(ch) else cp)
    members["X"] -= members["S"]
    L, N, S, X = (_class_body(sorted(members[k])) for k in ("L", "N", "S", "X"))
    return L, N, S, X


def _class_body(codepoints: list[int]) -> str:
    if not codepoints:
        return ""
    parts = []
    start = prev = codepoints[0]
    for cp in codepoints[1:] + [-1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
        start = prev = cp
    return "".join(parts)


@lru_cache(maxsize=None)
def _glide_pattern() -> re.Pattern:
    L, N, S, _ = _unicode_classes()
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
    )


@lru_cache(maxsize=None)
def _clip_patterns() -> tuple[re.Pattern, re.Pattern]:
    L, N, S, X = _unicode_classes()
    # The reference compiles the whole pattern case-insensitively; only the literals are affected
    # (`'s` also matches `'ſ`). A global re.IGNORECASE would differ: the standard `re` module would
    # then let case variants into the letter class; `regex` instead only keeps them out of the
    # negated class (see `_unicode_classes`).
    words = re.compile(
        rf"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[{L}]+|[{N}]|[^{S}{L}{N}{X}]+"
    )
    return words, re.compile(rf"[{S}]+")


# --------------------------------------------------------------------------------------------
# Byte-level BPE shared by GLIDE and CLIP


@lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """Reversible map from bytes to printable characters, so BPE never sees whitespace/control.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are moved, in order, to
    U+0100 onwards. Both reference vocabularies are written in this alphabet.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    moved = (b for b in range(256) if b not in table)
    for i, b in enumerate(moved):
        table[b] = chr(0x100 + i)
    return table


class _BPE:
    """Greedy lowest-rank-first pair merging with a per-word cache."""

    def __init__(self, ranks: dict[tuple[str, str], int]):
        self.ranks = ranks
        self.cache: dict[str, tuple[str, ...]] = {}

    def merge(
        self, symbols: tuple[str, ...], applied: list[tuple[str, str]] | None = None
    ) -> tuple[str, ...]:
        """The word's final pieces; each merged pair is appended to `applied` when given."""
        ranks = self.ranks
        word = list(symbols)
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            if applied is not None:
                applied.append(best)
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)


# --------------------------------------------------------------------------------------------
# GLIDE


@lru_cache(maxsize=None)
def _load_glide_tables(encoder_path: Path, merges_path: Path) -> tuple[dict[str, int], list[str], _BPE]:
    try:
        encoder = json.loads(_read_gzip_text(encoder_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"vocab file {encoder_path} is not valid JSON: {e}") from e
    if not isinstance(encoder, dict) or not encoder:
        raise ValueError(f"vocab file {encoder_path} must hold a JSON object token -> id")
    decoder = [""] * len(encoder)
    for token, idx in encoder.items():
        if not isinstance(idx, int) or not 0 <= idx < len(encoder) or decoder[idx]:
            raise ValueError(
                f"vocab file {encoder_path}: ids are not a permutation of "
                f"0..{len(encoder) - 1} (token {token!r} -> {idx!r})"
            )
        decoder[idx] = token
    # First line is a version header; the file ends with a newline.
    lines = _read_gzip_text(merges_path).split("\n")[1:-1]
    ranks = {}
    for rank, line in enumerate(lines):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(
                f"vocab file {merges_path}, line {rank + 2}: expected two symbols, got {line!r}"
            )
        ranks[(pair[0], pair[1])] = rank
    return encoder, decoder, _BPE(ranks)


class GlideBPETokenizer(Tokenizer):
    """GLIDE's byte-level BPE (GPT-2's vocabulary, 50257 tokens; text is lowercased first).

    Padding uses the end token 50256, as the reference's `padded_tokens_and_mask` does.
    """

    def __init__(self, vocab_dir: str | os.PathLike | None = None, *, offline: bool | None = None):
        encoder_path = vocab_file("encoder.json.gz", vocab_dir, offline=offline).resolve()
        merges_path = vocab_file("vocab.bpe.gz", vocab_dir, offline=offline).resolve()
        self._encoder, self._decoder, self._bpe = _load_glide_tables(encoder_path, merges_path)
        self._pattern = _glide_pattern()
        self._bytes = _byte_to_unicode()
        self._unbytes = {c: b for b, c in self._bytes.items()}

    @property
    def n_vocab(self) -> int:
        return len(self._encoder)

    @property
    def end_token(self) -> int:
        return self.n_vocab - 1

    @property
    def pad_token(self) -> int:
        return self.end_token

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        cache = self._bpe.cache
        for word in self._pattern.findall(text.lower()):
            pieces = cache.get(word)
            if pieces is None:
                symbols = tuple(self._bytes[b] for b in word.encode("utf-8"))
                pieces = cache[word] = self._bpe.merge(symbols)
            ids.extend(self._encoder[p] for p in pieces)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        chars = "".join(self._decoder[_check_id(i, self.n_vocab)] for i in ids)
        return bytes(self._unbytes[c] for c in chars).decode("utf-8", errors="replace")


def _check_id(i: int, n_vocab: int) -> int:
    if not 0 <= int(i) < n_vocab:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {n_vocab})")
    return int(i)


# --------------------------------------------------------------------------------------------
# CLIP


_CLIP_START, _CLIP_END = "<|startoftext|>", "<|endoftext|>"
_CLIP_N_MERGES = 49152 - 256 - 2
_CLIP_N_VOCAB = 512 + _CLIP_N_MERGES + 2
CLIP_TABLE_FORMAT = "glide-jax/clip-bpe-subset/v1"


@lru_cache(maxsize=None)
def _load_clip_tables(merges_path: Path) -> tuple[dict[str, int], list[str], _BPE]:
    lines = _read_gzip_text(merges_path).split("\n")[1 : _CLIP_N_MERGES + 1]
    if len(lines) != _CLIP_N_MERGES:
        raise ValueError(f"vocab file {merges_path} has {len(lines)} merges, expected {_CLIP_N_MERGES}")
    merges = []
    for n, line in enumerate(lines):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(
                f"vocab file {merges_path}, line {n + 2}: expected two symbols, got {line!r}"
            )
        merges.append(pair)
    # Vocabulary order: 256 byte symbols, the same with the end-of-word marker, the merges, then
    # the two special tokens.
    base = list(_byte_to_unicode().values())
    vocab = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [_CLIP_START, _CLIP_END]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    bpe = _BPE({m: r for r, m in enumerate(merges)})
    bpe.cache.update({_CLIP_START: (_CLIP_START,), _CLIP_END: (_CLIP_END,)})
    return encoder, vocab, bpe


def _clip_base_symbols() -> list[str]:
    base = list(_byte_to_unicode().values())
    return base + [s + "</w>" for s in base]


@lru_cache(maxsize=None)
def _load_clip_table(
    path: Path,
) -> tuple[dict[str, int], list[str | None], _BPE, frozenset[str]]:
    """Tables from a subset file (format `CLIP_TABLE_FORMAT`, written by demo/make_clip_tokenizer.py).

    The file is JSON: `{"format", "n_vocab": 49408, "words": [...], "merges": [[id, left, right],
    ...]}` plus optional `source` / `generated_by` notes. A merge's id is its token id in the full
    vocabulary (512 + its rank there), so sorting by id restores CLIP's merge order. `words` are the
    words whose whole merge path the file holds. Returns the encoder, a decoder with `None` at the
    ids the file lacks, the BPE and the covered words.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"CLIP BPE table {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"CLIP BPE table {path} is not readable JSON: {e}") from e

    def bad(what: str) -> ValueError:
        return ValueError(f"CLIP BPE table {path}: {what}")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    required, optional = {"format", "n_vocab", "words", "merges"}, {"source", "generated_by"}
    if missing := sorted(required - data.keys()):
        raise bad(f"missing key(s) {missing}")
    if unknown := sorted(data.keys() - required - optional):
        raise bad(f"unknown key(s) {unknown}")
    if data["format"] != CLIP_TABLE_FORMAT:
        raise bad(f"format is {data['format']!r}, expected {CLIP_TABLE_FORMAT!r}")
    if data["n_vocab"] != _CLIP_N_VOCAB:
        raise bad(f"n_vocab is {data['n_vocab']!r}; CLIP's BPE has {_CLIP_N_VOCAB} tokens")
    merges, words = data["merges"], data["words"]
    if not isinstance(merges, list):
        raise bad("merges must be a list of [id, left, right]")
    if not isinstance(words, list):
        raise bad("words must be a list of strings")

    decoder: list[str | None] = [None] * _CLIP_N_VOCAB
    base = _clip_base_symbols()
    decoder[: len(base)] = base
    encoder = {tok: i for i, tok in enumerate(base)}
    ranks: dict[tuple[str, str], int] = {}
    previous = len(base) - 1
    for n, entry in enumerate(merges):
        if not (
            isinstance(entry, list) and len(entry) == 3
            and isinstance(entry[0], int) and not isinstance(entry[0], bool)
            and all(isinstance(part, str) and part for part in entry[1:])
        ):
            raise bad(f"merges[{n}] = {entry!r}: expected [id, left symbol, right symbol]")
        idx, left, right = entry
        if not previous < idx < _CLIP_N_VOCAB - 2:
            raise bad(
                f"merges[{n}] = {entry!r}: ids must increase and lie in "
                f"[{len(base)}, {_CLIP_N_VOCAB - 2}); the previous id is {previous}"
            )
        # BPE creates a merge's two parts before the merge itself, so a table missing a part
        # (or holding it at a later id) was not cut from CLIP's vocabulary.
        for part in (left, right):
            if part not in encoder:
                raise bad(f"merges[{n}] = {entry!r}: {part!r} is neither a byte symbol nor an earlier merge")
        if left + right in encoder:
            raise bad(f"merges[{n}] = {entry!r}: {left + right!r} already has id {encoder[left + right]}")
        encoder[left + right] = idx
        decoder[idx] = left + right
        ranks[(left, right)] = idx - len(base)
        previous = idx
    for n, word in enumerate(words):
        if not isinstance(word, str) or not word:
            raise bad(f"words[{n}] = {word!r}: expected a non-empty string")
    for token, idx in ((_CLIP_START, _CLIP_N_VOCAB - 2), (_CLIP_END, _CLIP_N_VOCAB - 1)):
        encoder[token], decoder[idx] = idx, token
    bpe = _BPE(ranks)
    bpe.cache.update({_CLIP_START: (_CLIP_START,), _CLIP_END: (_CLIP_END,)})
    return encoder, decoder, bpe, frozenset(words) | {_CLIP_START, _CLIP_END}


# Latin ligatures and digraphs that ftfy spells out (other scripts' ligatures are kept).
_LATIN_LIGATURES = {
    "\u0132": "IJ", "\u0133": "ij", "\u0149": "\u02bcn",
    "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz",
    "\u01c4": "D\u017d", "\u01c5": "D\u017e", "\u01c6": "d\u017e",
    "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj",
    "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj",
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
    "\ufb05": "\u017ft", "\ufb06": "st",
}
_ANSI_ESCAPE = re.compile(r"\x1b\[[\d;]*[A-Za-z]")
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


@lru_cache(maxsize=None)
def _clip_char_maps() -> tuple[dict[int, str], dict[int, None]]:
    """`str.translate` tables: character repairs, then invisible controls to delete."""
    repairs: dict[int, str] = {ord(k): v for k, v in _LATIN_LIGATURES.items()}
    # Halfwidth/fullwidth forms to their usual width; the ideographic space to a space.
    repairs[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(cp))
        if normal != chr(cp):
            repairs[cp] = normal
    for cp in (0x02BC, *range(0x2018, 0x201C)):
        repairs[cp] = "'"
    for cp in range(0x201C, 0x2020):
        repairs[cp] = '"'
    # C0 controls except tab/newline/form feed/carriage return, DEL, deprecated Arabic format
    # controls, interlinear annotations, the object replacement character, the BOM.
    controls = (*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                0xFEFF, *range(0xFFF9, 0xFFFD))
    return repairs, dict.fromkeys(controls)


def clip_clean(text: str) -> str:
    """CLIP's text normalisation, with the parts of `ftfy.fix_text` that need no heuristics.

    The reference runs `ftfy.fix_text`, HTML-unescapes twice, collapses whitespace and
    lowercases. `ftfy` is not a dependency; this reproduces its deterministic repairs, in its
    order (entities ending in ';' unless the text contains '<', Latin ligatures such as ﬁ → fi,
    fullwidth/halfwidth forms, curly → straight quotes, terminal colour escapes and invisible
    control characters removed, NFC), but not its mojibake detection: text such as "cafÃ©"
    (which ftfy turns into "café"), C1 controls, UTF-16 surrogates and all-caps entity names
    ("&EACUTE;") may tokenize differently from the reference.
    """
    _, spaces = _clip_patterns()
    repairs, controls = _clip_char_maps()
    if "<" not in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    text = _ANSI_ESCAPE.sub("", text.translate(repairs)).translate(controls)
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return spaces.sub(" ", text).strip().lower()


class ClipBPETokenizer(Tokenizer):
    """CLIP's BPE (49408 tokens: start 49406, end 49407), as used by the noised CLIP.

    Text is cleaned by `clip_clean` (the reference's cleaning, less ftfy's mojibake repair).
    `pad_and_mask` / `tokenize_batch` give the raw ids padded with zeros and a mask;
    `padded_and_len` / `batch_padded_and_len` give what the noised CLIP's text encoder takes.

    `ClipBPETokenizer(vocab_dir)` reads the full vocabulary; `ClipBPETokenizer.from_table(path)`
    reads a subset of its merges (such as demo/clip/clip_bpe_subset.json), see there.
    """

    def __init__(self, vocab_dir: str | os.PathLike | None = None, *, offline: bool | None = None):
        path = vocab_file("bpe_simple_vocab_16e6.txt.gz", vocab_dir, offline=offline).resolve()
        encoder, decoder, bpe = _load_clip_tables(path)
        self._setup(path, encoder, decoder, bpe, covered=None)

    @classmethod
    def from_table(cls, path: str | os.PathLike) -> "ClipBPETokenizer":
        """A tokenizer from a subset of CLIP's merges that keep their original ids (no download).

        Same ids, n_vocab and special tokens as the full vocabulary. Every word the table was
        built for (its `words`, plus any single-byte word, which needs no merge) gets exactly the
        full vocabulary's ids. Any other word still gets valid ids, but possibly smaller pieces
        than the full vocabulary would give, so a model trained on the full vocabulary may read
        it differently; `uncovered_words(text)` names such words. `decode` rejects ids the
        table lacks.
        """
        path = Path(path).resolve()
        tokenizer = cls.__new__(cls)
        encoder, decoder, bpe, covered = _load_clip_table(path)
        tokenizer._setup(path, encoder, decoder, bpe, covered)
        return tokenizer

    def _setup(self, source: Path, encoder, decoder, bpe: _BPE, covered: frozenset[str] | None):
        self.source = source  # the vocabulary or table file, for messages
        self._encoder, self._decoder, self._bpe, self._covered = encoder, decoder, bpe, covered
        self._pattern, _ = _clip_patterns()
        self._bytes = _byte_to_unicode()
        self._unbytes = {c: b for b, c in self._bytes.items()}

    @property
    def n_vocab(self) -> int:
        return len(self._decoder)

    @property
    def is_subset(self) -> bool:
        """True when built from a subset table (`from_table`), which covers only some words."""
        return self._covered is not None

    @property
    def start_token(self) -> int:
        return self._encoder[_CLIP_START]

    @property
    def end_token(self) -> int:
        return self._encoder[_CLIP_END]

    @property
    def pad_token(self) -> int:
        return 0

    def words(self, text: str) -> list[str]:
        """The words BPE sees in `text`: the cleaned text split by CLIP's pattern."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        return self._pattern.findall(clip_clean(text))

    def _symbols(self, word: str) -> tuple[str, ...]:
        symbols = tuple(self._bytes[b] for b in word.encode("utf-8"))
        # The last symbol carries the end-of-word marker, so merges know word boundaries.
        return symbols[:-1] + (symbols[-1] + "</w>",)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        cache = self._bpe.cache
        for word in self._pattern.findall(clip_clean(text)):
            pieces = cache.get(word)
            if pieces is None:
                pieces = cache[word] = self._bpe.merge(self._symbols(word))
            ids.extend(self._encoder[p] for p in pieces)
        return ids

    def merge_path(self, word: str) -> list[tuple[int, str, str]]:
        """The merges `(token id, left, right)` BPE applies to one word (an item of `words`), in
        order: what a subset table must hold for the word to get this tokenizer's ids."""
        if word in (_CLIP_START, _CLIP_END):
            return []
        applied: list[tuple[str, str]] = []
        self._bpe.merge(self._symbols(word), applied)
        return [(self._encoder[a + b], a, b) for a, b in applied]

    def uncovered_words(self, text: str) -> list[str]:
        """The words of `text` (once each, in order) that a subset table may tokenize differently
        from the full vocabulary: those it was not built for. Empty for the full vocabulary."""
        if self._covered is None:
            return []
        uncovered = (
            w for w in self.words(text) if w not in self._covered and len(w.encode("utf-8")) > 1
        )
        return list(dict.fromkeys(uncovered))

    def decode(self, ids: Sequence[int]) -> str:
        pieces = []
        for i in ids:
            piece = self._decoder[_check_id(i, self.n_vocab)]
            if piece is None:
                raise ValueError(
                    f"token id {i} is not in the CLIP BPE table {self.source}, which holds only "
                    f"the merges of the words it was built for"
                )
            pieces.append(piece)
        text = bytes(self._unbytes[c] for c in "".join(pieces)).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def padded_and_len(self, text: str, ctx: int = 77) -> tuple[np.ndarray, int]:
        """`[start] + ids[:ctx-2] + [end]`, zero-padded to int32[ctx], and its length (≤ ctx)."""
        _check_ctx(ctx)
        if ctx < 2:
            raise ValueError(f"ctx must be at least 2 to hold CLIP's start and end tokens, got {ctx}")
        ids = [self.start_token] + self.encode(text)[: ctx - 2] + [self.end_token]
        tokens = np.zeros((ctx,), dtype=np.int32)
        tokens[: len(ids)] = ids
        return tokens, len(ids)

    def batch_padded_and_len(
        self, texts: Sequence[str], ctx: int = 77
    ) -> tuple[np.ndarray, np.ndarray]:
        """`tokens` int32[B, ctx] and `text_len` int32[B] for the noised CLIP's text encoder."""
        _check_texts(texts)
        rows = [self.padded_and_len(t, ctx) for t in texts]
        tokens = np.stack([r[0] for r in rows]) if rows else np.zeros((0, ctx), np.int32)
        return tokens, np.array([r[1] for r in rows], dtype=np.int32)


# --------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model trained on one's own captions.

    Id conventions (fixed by `train`): 0 is `<unk>`, 1 is the end token `</s>`, no start token.
    As with GLIDE, `encode` does not append the end token; `pad_and_mask` pads with it (id 1)
    and the mask marks the real tokens. Models trained elsewhere are loaded as they are: their
    `eos_id` (or, failing that, `pad_id`) is used as the pad token.
    """

    END_TOKEN = 1

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found")
        self.model_path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from e
        end = self._sp.eos_id()
        if end < 0:
            end = self._sp.pad_id()
        if end < 0:
            raise ValueError(
                f"sentencepiece model {path} defines neither an end (eos) nor a pad token; "
                f"train it with SentencePieceTokenizer.train or with eos_id set"
            )
        self._end = end

    @classmethod
    def train(
        cls,
        captions: str | os.PathLike | Iterable[str],
        model_path: str | os.PathLike,
        vocab_size: int,
        *,
        model_type: str = "unigram",
        normalization_rule_name: str = "nmt_nfkc_cf",
        character_coverage: float = 0.9995,
        seed: int = 0,
    ) -> "SentencePieceTokenizer":
        """Train on `captions` (a text file with one caption per line, or an iterable of strings).

        Deterministic: one thread, no sampling or shuffling of the input, a fixed random seed, so
        the same captions and options give a byte-identical `model_path`. The default
        normalisation (`nmt_nfkc_cf`, stored in the model) applies NFKC and case folding, like
        GLIDE's lowercasing. Writes only `model_path` (atomically).
        """
        import sentencepiece as spm

        if isinstance(captions, (str, os.PathLike)):
            source = Path(captions)
            if not source.is_file():
                raise FileNotFoundError(f"captions file {source} not found")
            with open(source, encoding="utf-8") as f:
                sentences = [line.rstrip("\n") for line in f]
            where = str(source)
        else:
            sentences = list(captions)
            where = "the given captions"
            for i, s in enumerate(sentences):
                if not isinstance(s, str):
                    raise TypeError(f"captions[{i}] must be a str, got {type(s).__name__}")
        sentences = [s for s in sentences if s.strip()]
        if not sentences:
            raise ValueError(f"no non-empty captions in {where}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
            raise ValueError(f"vocab_size must be an integer >= 4, got {vocab_size!r}")

        spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                normalization_rule_name=normalization_rule_name,
                character_coverage=character_coverage,
                unk_id=0,
                eos_id=cls.END_TOKEN,
                bos_id=-1,
                pad_id=-1,
                num_threads=1,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"sentencepiece training on {where} ({len(sentences)} captions, vocab_size "
                f"{vocab_size}, model_type {model_type!r}) failed: {e}"
            ) from e
        out = Path(model_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.getvalue())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return cls(out)

    @property
    def n_vocab(self) -> int:
        return self._sp.get_piece_size()

    @property
    def end_token(self) -> int:
        return self._end

    @property
    def pad_token(self) -> int:
        return self._end

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([_check_id(i, self.n_vocab) for i in ids])
