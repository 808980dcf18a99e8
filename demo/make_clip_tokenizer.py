"""Write the demo CLIP's own tokenizer: the merges of CLIP's BPE that the demo's captions use.

    python -m demo.make_clip_tokenizer --vocab-dir DIR --out demo/clip/clip_bpe_subset.json

The demo's noised CLIP was trained on CLIP's BPE ids, whose full vocabulary is a download; its
captions use a few dozen words, which need a few hundred of CLIP's merges. This script collects
every word the shapes domain can put in a caption (the caption templates, colours, kinds including
the extra training kinds and the partial captions' placeholder, relations, and the words the
caption parser accepts in a prompt), adds the words of many generated captions in case the shapes
module gained a phrasing the vocabulary misses, and writes each word's merges under the full BPE
with their ids (`ClipBPETokenizer.from_table` reads the file). `DIR` holds CLIP's
`bpe_simple_vocab_16e6.txt.gz` (checked against its pinned hash). The output depends only on the
shapes module and the vocabulary, so rerunning it gives the same file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from glide_jax import tokenizers  # noqa: E402

from demo import shapes  # noqa: E402

DEFAULT_OUT = ROOT / "demo" / "clip" / "clip_bpe_subset.json"
SAMPLED_SCENES = 1000


def vocabulary_captions() -> list[str]:
    """Texts that together hold every word of the domain: the templates with every slot value,
    and the caption parser's synonyms (users type prompts, not only the templates' phrasings)."""
    kinds = shapes.KINDS + shapes.EXTRA_KINDS
    colours = tuple(shapes.COLOURS)
    texts = []
    # Each colour, kind and relation in every slot of every template, the placeholder included.
    for colour in colours:
        for kind in kinds:
            for bg in colours:
                texts += shapes.captions_for(shapes.SceneSpec(bg, ((colour, kind),)))
            for relation in shapes.RELATIONS:
                spec = shapes.SceneSpec(colours[0], ((colour, kind), (colours[1], kinds[0])), relation)
                texts += shapes.captions_for(spec)
    # The parser's words for colours, kinds and relations (relation patterns: their literal words).
    # "shape" stands for any kind in a typed prompt ("a white shape").
    texts += list(shapes._COLOUR_WORDS) + list(shapes._KIND_WORDS) + ["background backdrop", "shape"]
    for pattern, _ in shapes._RELATION_PATTERNS:
        texts += re.findall(r"[a-z]+", pattern.pattern.replace(r"\b", " "))
    return texts


def sampled_captions(count: int = SAMPLED_SCENES, seed: int = 0) -> Iterator[str]:
    """Every phrasing and training negative of `count` scenes per data stream."""
    streams = [("train", (), ()), ("heldout", (), ()),
               ("train", ("black", "gray"), shapes.EXTRA_KINDS)]
    for split, extra_colours, extra_kinds in streams:
        for index in range(count):
            scene = shapes.scene_at(seed, index, split, extra_colours, extra_kinds)
            yield from scene.captions()
            spec = scene.spec
            for attribute in ("colour", "kind"):
                other = shapes.swapped(scene, attribute)
                if other is not None:
                    yield from other.captions()
            if spec.relation is not None:
                for other in shapes.other_relations(spec):
                    yield from shapes.captions_for(other)


def domain_words(tokenizer: tokenizers.ClipBPETokenizer,
                 sampled: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """The domain's words as CLIP splits them, sorted, and those of them that only the sampled
    captions contained (expected empty: else `vocabulary_captions` misses a source of words)."""
    words: set[str] = set()
    for text in vocabulary_captions():
        words.update(tokenizer.words(text))
    seen: set[str] = set()
    for text in set(sampled_captions() if sampled is None else sampled):
        seen.update(tokenizer.words(text))
    return sorted(words | seen), sorted(seen - words)


def build_table(full: tokenizers.ClipBPETokenizer, words: Iterable[str]) -> dict:
    """The subset table for `words` under the full vocabulary `full`."""
    if full.is_subset:
        raise ValueError(f"build_table needs the full vocabulary, got the subset table {full.source}")
    merges = {}
    for word in words:
        for idx, left, right in full.merge_path(word):
            merges[idx] = (left, right)
    return {
        "format": tokenizers.CLIP_TABLE_FORMAT,
        "source": {
            "file": "bpe_simple_vocab_16e6.txt.gz",
            "sha256": tokenizers.VOCAB_SHA256["bpe_simple_vocab_16e6.txt.gz"],
        },
        "generated_by": "python -m demo.make_clip_tokenizer --vocab-dir DIR",
        "n_vocab": full.n_vocab,
        "words": sorted(words),
        "merges": [[idx, *merges[idx]] for idx in sorted(merges)],
    }


def dumps_table(table: dict) -> str:
    """JSON with one merge per line, so that a change to the domain reads as a small diff."""
    lines = ["{"]
    for key, value in table.items():
        if key == "merges":
            body = ",\n".join("    " + json.dumps(m) for m in value)
            lines.append(f'  "merges": [\n{body}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    if not lines[-1].startswith('  "merges"'):
        raise ValueError("merges must be the table's last key")
    return "\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-dir", required=True,
                        help="folder with CLIP's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    args = parser.parse_args(argv)

    full = tokenizers.ClipBPETokenizer(args.vocab_dir)
    words, only_sampled = domain_words(full)
    if only_sampled:
        print(f"note: sampled captions hold words the vocabulary list misses (included): "
              f"{only_sampled}", file=sys.stderr)
    text = dumps_table(build_table(full, words))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    check = tokenizers.ClipBPETokenizer.from_table(args.out)
    for word in words:
        if check.encode(word) != full.encode(word):
            raise AssertionError(f"{args.out}: {word!r} tokenizes differently from the full vocabulary")
    n_merges = len(json.loads(text)["merges"])
    print(f"wrote {args.out}: {len(words)} words, {n_merges} merges, {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
