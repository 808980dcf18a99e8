"""Tokenizers: exact ids against the reference (golden file and extra vectors), padding, errors."""

import gzip
import http.server
import json
import random
import threading
import unicodedata

import numpy as np
import pytest

from glide_jax import tokenizers
from glide_jax.download import DownloadError
from glide_jax.tokenizers import (
    VOCAB_SHA256,
    ClipBPETokenizer,
    GlideBPETokenizer,
    SentencePieceTokenizer,
)

# Ids produced by the reference tokenizers themselves (glide_text2im's `bpe.py` with `regex`, and
# `simple_tokenizer.py` with `regex` and ftfy 6.3.1) for strings chosen to stress the
# pre-tokenisation: accents, CJK, Hangul, digits in several scripts, emoji sequences,
# contractions in both cases, runs of spaces, trailing spaces, newlines, tabs, U+001C..U+001F
# (whitespace for `re`, not for `regex`), U+0345, long s, fullwidth text, ligatures, entities.
# (prompt, glide_ids, clip_ids)
EXTRA_CASES = [
    ('Crème brûlée à la française', [6098, 14064, 1326, 865, 42324, 75, 22161, 28141, 8591, 1216, 272, 50041, 786], [1075, 12138, 614, 711, 127, 119, 75, 13489, 21259, 1210, 38381, 30505]),
    ('東京タワーの夜景、油絵', [30266, 109, 12859, 105, 23376, 25589, 6312, 5641, 13783, 250, 162, 247, 107, 23513, 162, 110, 117, 163, 113, 113], [48338, 21078, 105, 34941, 2429, 107, 13457, 21575, 23170, 250, 48132, 363, 45262, 162, 110, 117, 37810, 369]),
    ('한국어 텍스트', [47991, 250, 166, 113, 255, 168, 244, 112, 220, 169, 227, 235, 168, 232, 97, 169, 232, 116], [15197, 250, 31871, 255, 31625, 368, 169, 227, 235, 20305, 39820]),
    ('year 2024: 3 cats, 42 dogs & 1.5e10 fish', [1941, 48609, 25, 513, 11875, 11, 5433, 6844, 1222, 352, 13, 20, 68, 940, 5916], [935, 273, 271, 273, 275, 281, 274, 3989, 267, 275, 273, 3255, 261, 272, 269, 276, 324, 272, 271, 2759]),
    ('party 🎉🎉 with 👩\u200d👩\u200d👧 family and ❤️', [10608, 12520, 236, 231, 8582, 236, 231, 351, 50169, 102, 447, 235, 41840, 102, 447, 235, 41840, 100, 1641, 290, 43074, 97, 37929], [1580, 13450, 593, 26304, 26304, 964, 356, 1315, 537, 1752]),
    ("They've we'll she'd I'M IT'S don't", [9930, 1053, 356, 1183, 673, 1549, 1312, 1101, 340, 338, 836, 470], [889, 1200, 649, 1342, 1043, 1896, 328, 880, 585, 568, 847, 713]),
    ('it’s “quoted”', [270, 447, 247, 82, 564, 250, 421, 5191, 447, 251], [585, 568, 257, 27706, 257]),
    ('two  spaces   three    four', [11545, 220, 9029, 220, 220, 1115, 220, 220, 220, 1440], [1237, 9006, 2097, 2721]),
    ('trailing spaces   ', [9535, 4386, 9029, 220, 220, 220], [37427, 9006]),
    ('   ', [220, 220, 220], []),
    ('line one\nline two\r\nline three\n\n', [1370, 530, 198, 1370, 734, 201, 198, 1370, 1115, 628], [1148, 637, 1148, 1237, 1148, 2097]),
    ('col1\tcol2\t\tcol3\t', [4033, 16, 197, 4033, 17, 197, 197, 4033, 18, 197], [9371, 272, 9371, 273, 9371, 274]),
    ('mixed \t\n whitespace \u3000 ideographic', [76, 2966, 220, 197, 198, 13216, 10223, 220, 5099, 222, 1405, 6826], [6780, 4699, 2138, 1909, 78, 4245]),
    ('\xa0nbsp\xa0 \u2009thin', [1849, 77, 24145, 1849, 220, 447, 231, 40871], [6459, 4393, 7847]),
    ('x\x1cy\x1fz', [87, 216, 88, 219, 89], [20023, 345]),
    ('a \x1c\x1db\x1e \x1f', [64, 220, 216, 217, 65, 218, 220, 219], [320, 321]),
    ('a  \x1c  b\x1f\n', [64, 220, 220, 216, 220, 275, 219, 198], [320, 321]),
    ('ÆØÅ æøå ß ẞ', [21241, 24172, 29090, 6184, 99, 24172, 29090, 6184, 253, 6184, 253], [42495, 17483, 127, 354, 42495, 17483, 127, 354, 127, 509, 127, 509]),
    ('İstanbul ıi', [72, 136, 229, 24179, 220, 30102, 72], [328, 16384, 11231, 18562, 328]),
    ('١٢٣ Arabic digits ٤٥', [149, 94, 149, 95, 149, 96, 610, 397, 291, 19561, 18923, 97, 149, 98], [149, 350, 149, 351, 149, 352, 16709, 31710, 149, 353, 149, 354]),
    ('Ⅻ roman ½ ⅓ ²³', [158, 227, 119, 374, 5185, 25208, 2343, 227, 241, 1587, 110, 126, 111], [158, 227, 375, 7370, 33613, 158, 227, 497, 41175, 126, 367]),
    ("'s 'S 'ſ test's", [338, 705, 82, 705, 129, 123, 1332, 338], [568, 568, 6, 129, 379, 1628, 568]),
    ('<|startoftext|>hello<|endoftext|>', [27, 91, 9688, 1659, 5239, 91, 29, 31373, 27, 91, 437, 1659, 5239, 91, 29], [49406, 3306, 49407]),
    ('é decomposed vs é', [68, 136, 223, 38237, 1335, 3691, 38251], [4166, 561, 19916, 1547, 4166]),
    ('ͅ ypogegrammeni aͅb', [137, 227, 331, 7501, 469, 4546, 3653, 72, 257, 137, 227, 65], [88, 628, 619, 2949, 1552, 328, 320, 321]),
    ('ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ', [171, 121, 228, 171, 121, 243, 171, 121, 234, 171, 121, 234, 171, 121, 245, 171, 121, 231, 171, 121, 226, 171, 121, 242, 171, 121, 230, 27332, 121, 242, 171, 121, 227, 171, 121, 246, 171, 121, 242], [9407, 23571, 4160]),
    ('ﬁne ﬂower', [171, 105, 223, 710, 27332, 105, 224, 789], [3797, 4055]),
    ('&amp; &lt;tag&gt; &quot;x&quot;', [5, 696, 26, 1222, 2528, 26, 12985, 5, 13655, 26, 1222, 421, 313, 26, 87, 5, 421, 313, 26], [261, 283, 3640, 285, 257, 343, 257]),
    ('snake_case-kebab.case/path\\back', [16184, 539, 62, 7442, 12, 365, 65, 397, 13, 7442, 14, 6978, 59, 1891], [8798, 318, 2068, 268, 36497, 269, 2068, 270, 5035, 315, 893]),
    ('$100 @user #tag %50 ^_^ ~tilde~', [3, 3064, 2488, 7220, 1303, 12985, 4064, 1120, 10563, 62, 61, 5299, 83, 44725, 93], [259, 272, 271, 271, 287, 7031, 258, 3640, 260, 276, 271, 15995, 349, 6124, 654, 349]),
]


@pytest.fixture(scope="module")
def golden_cases(golden):
    with open(golden / "tokenizers.json", encoding="utf-8") as f:
        data = json.load(f)
    return data


@pytest.fixture(scope="module")
def glide(golden):
    return GlideBPETokenizer(golden / "vocab")


@pytest.fixture(scope="module")
def clip(golden):
    return ClipBPETokenizer(golden / "vocab")


def test_golden_meta(golden_cases, glide, clip):
    meta = golden_cases["meta"]
    assert glide.n_vocab == meta["glide_n_vocab"]
    assert glide.end_token == glide.pad_token == meta["glide_end_token"]
    assert clip.n_vocab == meta["clip_vocab_size"]
    assert (clip.start_token, clip.end_token) == (meta["clip_start_token"], meta["clip_end_token"])


def _lengths(cases):
    """The padded lengths the golden cases were made with, from their key names
    (`glide_padded_<n>`, `clip_padded_<n>`), so a golden set made the same way passes."""
    def one(prefix):
        found = {int(k[len(prefix):]) for case in cases for k in case if k.startswith(prefix)}
        assert len(found) == 1, (prefix, found)
        return found.pop()
    return one("glide_padded_"), one("clip_padded_")


def test_golden_glide_cases(golden_cases, glide):
    cases = golden_cases["cases"]
    n, _ = _lengths(cases)
    # Not vacuous: there are cases, each a different prompt.
    assert cases and len({c["prompt"] for c in cases}) == len(cases)
    for case in cases:
        prompt = case["prompt"]
        ids = glide.encode(prompt)
        assert ids == case["glide_ids"], prompt
        tokens, mask = glide.pad_and_mask(ids, n)
        assert tokens.dtype == np.int32 and mask.dtype == np.bool_
        assert tokens.tolist() == case[f"glide_padded_{n}"], prompt
        assert mask.tolist() == case[f"glide_mask_{n}"], prompt


def test_golden_clip_cases(golden_cases, clip):
    _, n = _lengths(golden_cases["cases"])
    for case in golden_cases["cases"]:
        prompt = case["prompt"]
        assert clip.encode(prompt) == case["clip_ids"], prompt
        tokens, length = clip.padded_and_len(prompt, n)
        assert tokens.dtype == np.int32
        assert tokens.tolist() == case[f"clip_padded_{n}"], prompt
        assert length == case[f"clip_len_{n}"], prompt


def test_golden_batches(golden_cases, glide, clip):
    cases = golden_cases["cases"]
    n, n_clip = _lengths(cases)
    prompts = [c["prompt"] for c in cases]
    tokens, mask, truncated = glide.tokenize_batch(prompts, n, return_truncated=True)
    assert tokens.shape == mask.shape == (len(cases), n)
    np.testing.assert_array_equal(tokens, [c[f"glide_padded_{n}"] for c in cases])
    np.testing.assert_array_equal(mask, [c[f"glide_mask_{n}"] for c in cases])
    np.testing.assert_array_equal(truncated, [len(c["glide_ids"]) > n for c in cases])
    assert truncated.any(), f"the golden file has a prompt longer than {n} tokens"
    assert len(glide.tokenize_batch(prompts, n)) == 2

    clip_tokens, lengths = clip.batch_padded_and_len(prompts, n_clip)
    np.testing.assert_array_equal(clip_tokens, [c[f"clip_padded_{n_clip}"] for c in cases])
    np.testing.assert_array_equal(lengths, [c[f"clip_len_{n_clip}"] for c in cases])


@pytest.mark.parametrize("prompt, glide_ids, clip_ids", EXTRA_CASES, ids=range(len(EXTRA_CASES)))
def test_extra_reference_vectors(glide, clip, prompt, glide_ids, clip_ids):
    assert glide.encode(prompt) == glide_ids
    assert clip.encode(prompt) == clip_ids


def test_patterns_match_regex_package_on_every_code_point():
    """Compare the stdlib patterns with the reference's `regex` patterns on all assigned code points.

    Each code point appears in several shuffled strings mixed with spaces, apostrophes, letters
    and digits, so every class boundary is exercised. Needs the optional `regex` package.
    """
    regex = pytest.importorskip("regex")
    ref_glide = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    ref_clip = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    ref_space = regex.compile(r"\s+")
    glide_pat = tokenizers._glide_pattern()
    clip_pat, space_pat = tokenizers._clip_patterns()
    # Letters/numbers assigned after this Python's Unicode version are a documented difference.
    assigned = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    glue = list(" \t\n  'sStTdDmM<|>a1") + ["ll", "re", "ve", "\u3000", "\x1c"]
    rng = random.Random(0)
    rng.shuffle(assigned)
    for start in range(0, len(assigned), 48):
        chars = assigned[start : start + 48]
        text = "".join(c + (rng.choice(glue) if rng.random() < 0.5 else "") for c in chars)
        for t in (text, text.lower()):
            assert glide_pat.findall(t) == ref_glide.findall(t), ascii(t)
            assert clip_pat.findall(t) == ref_clip.findall(t), ascii(t)
            assert space_pat.sub(" ", t) == ref_space.sub(" ", t), ascii(t)


def test_decode_round_trip(glide, clip):
    text = "An Oil painting, 3 corgis — café 日本 🐶\n\ttabs  "
    assert glide.decode(glide.encode(text)) == text.lower()
    assert clip.decode(clip.encode("A Corgi, wearing a hat!")) == "a corgi , wearing a hat ! "
    with pytest.raises(ValueError, match="outside the vocabulary"):
        glide.decode([glide.n_vocab])


def test_pad_and_mask_edges(glide, clip):
    tokens, mask = glide.pad_and_mask([1, 2, 3], 5)
    assert tokens.tolist() == [1, 2, 3, 50256, 50256] and mask.tolist() == [True] * 3 + [False] * 2
    tokens, mask = glide.pad_and_mask(list(range(10)), 4)
    assert tokens.tolist() == [0, 1, 2, 3] and mask.all()
    tokens, mask = clip.pad_and_mask([5], 3)
    assert tokens.tolist() == [5, 0, 0]
    empty_tokens, empty_mask = glide.tokenize_batch([], 8)
    assert empty_tokens.shape == (0, 8) and empty_mask.shape == (0, 8)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="ctx must be a positive integer"):
            glide.pad_and_mask([1], bad)
    with pytest.raises(TypeError, match="single string"):
        glide.tokenize_batch("a cat", 8)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        glide.tokenize_batch(["a", 3], 8)
    with pytest.raises(ValueError, match="at least 2"):
        clip.padded_and_len("a cat", 1)
    tokens, length = clip.padded_and_len("a cat", 2)
    assert tokens.tolist() == [49406, 49407] and length == 2


def test_clip_cleaning():
    clean = tokenizers.clip_clean
    assert clean("  &amp;lt;B&amp;gt;\u201cHi\u201d\ufb01 \uff21\uff11\u3000x\x00 \x1b[31mred\x1b[0m ") == (
        '<b>"hi"fi a1 x red'
    )
    assert clean("e\u0301") == "\u00e9"


def test_missing_vocab_offline_names_file_cache_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("GLIDE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLIDE_JAX_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        GlideBPETokenizer()
    message = str(info.value)
    assert "encoder.json.gz" in message
    assert str(tmp_path / "cache" / "vocab") in message
    assert tokenizers.VOCAB_URL.format(name="encoder.json.gz") in message
    assert "offline" in message


def test_missing_or_wrong_file_in_vocab_dir(tmp_path, golden):
    with pytest.raises(FileNotFoundError) as info:
        ClipBPETokenizer(tmp_path)
    message = str(info.value)
    assert "bpe_simple_vocab_16e6.txt.gz" in message and str(tmp_path) in message
    assert "https://raw.githubusercontent.com/openai/glide-text2im/main/" in message
    with gzip.open(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "wb") as f:
        f.write(b"#version\na b\n")
    with pytest.raises(ValueError, match="has sha256 .* expected " + VOCAB_SHA256["bpe_simple_vocab_16e6.txt.gz"]):
        ClipBPETokenizer(tmp_path)


def test_vocab_downloaded_into_cache_once(tmp_path, golden, monkeypatch):
    """The first use downloads into the cache (hash checked); later uses work offline."""
    vocab = golden / "vocab"

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(vocab), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(tokenizers, "VOCAB_URL", f"http://127.0.0.1:{server.server_address[1]}/{{name}}")
        monkeypatch.setenv("GLIDE_JAX_CACHE", str(tmp_path))
        monkeypatch.delenv("GLIDE_JAX_OFFLINE", raising=False)
        tok = ClipBPETokenizer()
        cached = tmp_path / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
        assert cached.read_bytes() == (vocab / cached.name).read_bytes()
    finally:
        server.shutdown()
        server.server_close()
    assert ClipBPETokenizer(offline=True).encode("a corgi") == tok.encode("a corgi")


CAPTIONS = [
    f"a {adj} {noun} {verb} {place}"
    for adj in ("red", "small", "fluffy", "shiny", "ancient", "blue", "tiny", "happy")
    for noun in ("corgi", "cat", "teapot", "robot", "castle", "balloon")
    for verb in ("sitting in", "flying over", "painted on", "next to")
    for place in ("a garden", "the moon", "a city street", "an ocean")
]


def test_sentencepiece_train_save_load(tmp_path):
    path = tmp_path / "sp" / "captions.model"
    tok = SentencePieceTokenizer.train(CAPTIONS, path, vocab_size=40)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["captions.model"]
    assert tok.n_vocab == 40 and tok.end_token == tok.pad_token == SentencePieceTokenizer.END_TOKEN

    ids = tok.encode("A Fluffy corgi flying over the moon")
    assert 0 not in ids, "every word of this caption is in the training set: no <unk>"
    assert tok.decode(ids) == "a fluffy corgi flying over the moon"  # case folded by the model
    reloaded = SentencePieceTokenizer(path)
    assert reloaded.encode("a fluffy corgi flying over the moon") == ids

    tokens, mask = tok.pad_and_mask(ids, 32)
    assert tokens[len(ids):].tolist() == [1] * (32 - len(ids)) and mask.sum() == len(ids)
    batch, batch_mask, truncated = tok.tokenize_batch(["a cat", CAPTIONS[0] * 5], 8, return_truncated=True)
    assert batch.shape == (2, 8) and truncated.tolist() == [False, True] and batch_mask[1].all()


def test_sentencepiece_training_is_deterministic(tmp_path):
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("\n".join(CAPTIONS) + "\n\n", encoding="utf-8")
    SentencePieceTokenizer.train(captions_file, tmp_path / "a.model", vocab_size=40, model_type="bpe")
    SentencePieceTokenizer.train(iter(CAPTIONS), tmp_path / "b.model", vocab_size=40, model_type="bpe")
    SentencePieceTokenizer.train(CAPTIONS, tmp_path / "c.model", vocab_size=40, model_type="unigram")
    a, b, c = ((tmp_path / f"{n}.model").read_bytes() for n in "abc")
    assert a == b, "same captions and options must give the same model file"
    assert a != c


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file .*nope.txt"):
        SentencePieceTokenizer.train(tmp_path / "nope.txt", tmp_path / "m.model", vocab_size=50)
    with pytest.raises(ValueError, match="no non-empty captions"):
        SentencePieceTokenizer.train(["", "  "], tmp_path / "m.model", vocab_size=50)
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        SentencePieceTokenizer.train(CAPTIONS, tmp_path / "m.model", vocab_size=2)
    with pytest.raises(ValueError, match="vocab_size 5000"):
        SentencePieceTokenizer.train(CAPTIONS[:5], tmp_path / "m.model", vocab_size=5000)
    assert not (tmp_path / "m.model").exists()
    with pytest.raises(FileNotFoundError, match="sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


# --------------------------------------------------------------------------------------------
# The demo CLIP's subset table (demo/clip/clip_bpe_subset.json)

import re  # noqa: E402
from pathlib import Path  # noqa: E402

from demo import make_clip_tokenizer  # noqa: E402

CLIP_TABLE = Path(__file__).resolve().parent.parent / "demo" / "clip" / "clip_bpe_subset.json"


@pytest.fixture(scope="module")
def clip_subset():
    return ClipBPETokenizer.from_table(CLIP_TABLE)


def _demo_captions(count):
    """`count` captions of the demo domain: random specs over every colour, kind (extra ones and the
    partial captions' placeholder too), relation and template, then the training streams' own."""
    shapes = make_clip_tokenizer.shapes
    rng = random.Random(1)
    colours, kinds = list(shapes.COLOURS), list(shapes.KINDS + shapes.EXTRA_KINDS)
    captions = []
    while len(captions) < count // 2:
        n = rng.choice((1, 2))
        objects = tuple((rng.choice(colours), rng.choice(kinds)) for _ in range(n))
        spec = shapes.SceneSpec(rng.choice(colours), objects,
                                rng.choice(shapes.RELATIONS) if n == 2 else None)
        captions += shapes.captions_for(spec)
    captions += list(make_clip_tokenizer.sampled_captions(count=count // 200, seed=3))
    return list(dict.fromkeys(captions))


def test_clip_subset_table_matches_full_vocabulary_on_demo_captions(clip, clip_subset):
    captions = _demo_captions(5000)
    assert len(captions) >= 3000   # distinct ones: the duplicates of the random specs are dropped
    templates = make_clip_tokenizer.shapes._SINGLE_TEMPLATES + make_clip_tokenizer.shapes._PAIR_TEMPLATES
    # Every template's fixed words (what is left with the slots cut out) occur in the sample.
    joined = "\n".join(captions)
    for template in templates:
        for fixed in re.split(r"\{\w+\}", template):
            assert fixed in joined, (template, fixed)
    # Prompts typed with the words the caption parser accepts besides the templates'.
    captions += ["A Grey Disc over a violet DISK, on a black backdrop.",
                 "circles beneath squares, triangles under a white shape",
                 "red cross on the left of a green diamond, gray background!"]
    for caption in captions:
        assert clip_subset.encode(caption) == clip.encode(caption), caption
    assert not any(clip_subset.uncovered_words(c) for c in captions), "all demo words are covered"
    for ctx in (24, 77):
        sub_tokens, sub_len = clip_subset.batch_padded_and_len(captions, ctx)
        full_tokens, full_len = clip.batch_padded_and_len(captions, ctx)
        np.testing.assert_array_equal(sub_tokens, full_tokens)
        np.testing.assert_array_equal(sub_len, full_len)
    assert (clip_subset.n_vocab, clip_subset.start_token, clip_subset.end_token) == (49408, 49406, 49407)
    assert clip_subset.decode(clip_subset.encode(captions[0])) == clip.decode(clip.encode(captions[0]))


def test_clip_subset_table_is_what_the_script_writes(clip):
    """The committed table is current: regenerating it from the shapes vocabulary changes nothing,
    and the script's sampled captions find no word that vocabulary misses."""
    words, only_sampled = make_clip_tokenizer.domain_words(clip, sampled=_demo_captions(2000))
    assert only_sampled == []
    table = make_clip_tokenizer.build_table(clip, words)
    assert make_clip_tokenizer.dumps_table(table) == CLIP_TABLE.read_text(encoding="utf-8")
    assert 100 <= len(table["merges"]) <= 1000 and CLIP_TABLE.stat().st_size < 16_000
    assert {"red", "triangle", "background", "diamond", "shape", "left", "beneath"} <= set(table["words"])


def test_clip_subset_out_of_domain_words(clip, clip_subset):
    prompt = "a red zebra, café 🦓 on a blue background"
    assert clip_subset.uncovered_words(prompt) == ["zebra", "café", "🦓"]
    assert clip.uncovered_words(prompt) == []
    ids = clip_subset.encode(prompt)
    assert all(0 <= i < 49408 for i in ids)
    assert ids != clip.encode(prompt), "zebra is one token in the full vocabulary, pieces here"
    # Smaller pieces of the same bytes: the text survives, only the split differs.
    assert clip_subset.decode(ids) == clip.decode(clip.encode(prompt))
    zebra = clip.encode("zebra")
    assert len(zebra) == 1 and len(clip_subset.encode("zebra")) > 1
    with pytest.raises(ValueError, match="token id .* is not in the CLIP BPE table .*clip_bpe_subset.json"):
        clip_subset.decode(zebra)
    # Single-byte words need no merge, so they are covered whatever the table holds.
    assert clip_subset.uncovered_words("a 7 . x <|endoftext|>") == []


def test_clip_subset_table_loads_offline_with_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLIDE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLIDE_JAX_OFFLINE", "1")

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"the subset table must not fetch anything: {args}")

    monkeypatch.setattr(tokenizers.download, "fetch", no_fetch)
    copy = tmp_path / "clip" / "clip_bpe_subset.json"
    copy.parent.mkdir()
    copy.write_bytes(CLIP_TABLE.read_bytes())  # a path never loaded before, so not an lru hit
    tok = ClipBPETokenizer.from_table(copy)
    assert tok.is_subset and tok.source == copy.resolve()
    tokens, length = tok.padded_and_len("a red circle on a white background", 24)
    assert length == 9 and tokens[0] == 49406 and tokens[8] == 49407 and not tokens[9:].any()
    assert not (tmp_path / "cache").exists()
    assert ClipBPETokenizer.from_table(copy)._bpe is tok._bpe, "tables are cached per file"


def _corrupt(table, where):
    bad = json.loads(json.dumps(table))
    where(bad)
    return bad


@pytest.mark.parametrize("corruption, message", [
    (lambda t: t.pop("merges"), r"missing key\(s\) \['merges'\]"),
    (lambda t: t.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda t: t.update(format="v0"), "format is 'v0'"),
    (lambda t: t.update(n_vocab=50000), "n_vocab is 50000"),
    (lambda t: t["merges"].__setitem__(3, [515, "r"]), r"merges\[3\] = \[515, 'r'\]: expected \[id"),
    (lambda t: t["merges"].__setitem__(3, ["515", "r", "e"]), r"merges\[3\]"),
    (lambda t: t["merges"].insert(0, t["merges"].pop(1)), r"merges\[1\] = \[512, .*ids must increase"),
    (lambda t: t["merges"].__setitem__(0, [49406, "i", "n"]), r"merges\[0\] = .*ids must increase"),
    (lambda t: t["merges"].pop(0), r"'in' is neither a byte symbol nor an earlier merge"),
    (lambda t: t["merges"].insert(1, [512, "i", "n"]), r"merges\[1\] = \[512, 'i', 'n'\]"),
    (lambda t: t["words"].append(3), r"words\[\d+\] = 3"),
])
def test_clip_subset_table_rejects_a_corrupt_file(tmp_path, corruption, message):
    table = json.loads(CLIP_TABLE.read_text(encoding="utf-8"))
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_corrupt(table, corruption)), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        ClipBPETokenizer.from_table(path)
    assert str(path) in str(info.value)


def test_clip_subset_table_unreadable_or_missing(tmp_path):
    path = tmp_path / "table.json"
    path.write_text('{"format": ', encoding="utf-8")
    with pytest.raises(ValueError, match=f"CLIP BPE table {re.escape(str(path))} is not readable JSON"):
        ClipBPETokenizer.from_table(path)
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        ClipBPETokenizer.from_table(tmp_path / "nope.json")
