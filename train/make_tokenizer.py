"""Train a sentencepiece tokenizer on the captions of a run's data source.

    python -m train.make_tokenizer --config configs/train_shapes_base.json --vocab-size 40

writes the model to the run config's `tokenizer.path` (or `--out`). Captions are read record by
record from `data.source` (at most `--max-records`), so it works for every source kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.make_tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config JSON whose data.source is read")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", help="model file (default: the config's tokenizer.path)")
    parser.add_argument("--max-records", type=int, default=20000)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args(argv)

    import numpy as np

    from glide_jax import data, tokenizers
    from glide_jax.config import ConfigError, read_json_object
    from train.run_config import DataSection, apply_overrides, import_plugins

    try:
        raw = apply_overrides(read_json_object(args.config, "run config"), args.overrides)
        out = args.out or raw.get("tokenizer", {}).get("path")
        if not out:
            raise ConfigError("tokenizer.path is not set; pass --out")
        section = raw.get("data", {})
        import_plugins(section.get("plugins", DataSection().plugins))
        source = data.make_source(dict(section.get("source", DataSection().source)))
    except (ConfigError, data.DataError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    captions = []
    for index in range(min(len(source), args.max_records)):
        try:
            _, caption = source.load(index, 0, 8, np.random.default_rng(index))
        except data.SkipExample:
            continue
        captions.append(caption)
    try:
        tokenizer = tokenizers.SentencePieceTokenizer.train(captions, Path(out), args.vocab_size)
    except ValueError as err:   # e.g. a vocabulary larger than the captions support
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {tokenizer.n_vocab} pieces from {len(captions)} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
