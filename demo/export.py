"""Turn a `train.train` run into a bundled demo model, or seed the inpainting run from the base.

    python demo/export.py model --run out/demo_runs/base --out demo/base --tokenizer demo/tokenizer.model
    python demo/export.py model --run out/demo_runs/clip --out demo/clip
    python demo/export.py inpaint-init --run out/demo_runs/base --out out/demo_runs/inpaint_init

`model` takes the EMA params of the run's newest checkpoint, stores them as float16 (half the
size of float32; `sample.generate` upcasts on load) with the model's config through
`glide_jax.checkpoint.save_model`, and copies the model's tokenizer next to them, which is how
the sampling CLI knows which tokenizer goes with the model. `inpaint-init` writes the base's
float32 EMA params with the input convolution widened from 3 to 7 channels (the masked image and
the mask), the new input weights zero, so the inpainting model starts as exactly the base model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INPUT_CONV = ("unet", "input_blocks_0_0", "kernel")


def newest_run_state(run: Path) -> tuple[int, dict, dict]:
    """(step, run config, EMA params as float32 numpy) of the newest checkpoint in `run`."""
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in run.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise SystemExit(f"error: no checkpoint (<step>/state) in {run}")
    step = steps[-1]
    raw = json.loads((run / str(step) / "run" / "metadata").read_text()) if (
        run / str(step) / "run" / "metadata").is_file() else None
    if raw is None:
        raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(run / str(step) / "run")
    state = ocp.StandardCheckpointer().restore(run / str(step) / "state")
    ema = state["ema_params"]
    import jax
    return step, raw, jax.tree.map(lambda a: np.asarray(a, np.float32), ema)


def model_config(raw: dict) -> dict:
    from glide_jax.clip import ClipConfig
    from glide_jax.config import ModelConfig

    options = raw["model"]
    if isinstance(options, str):
        options = json.loads((ROOT / options).read_text())
    if raw["model_kind"] == "clip":
        return ClipConfig.from_dict(options).to_dict()
    return ModelConfig.from_dict(options).to_dict()


def export_model(args) -> None:
    import jax

    from glide_jax import checkpoint

    step, raw, params = newest_run_state(Path(args.run).absolute())
    config = model_config(raw)
    half = jax.tree.map(lambda a: a.astype(np.float16) if np.issubdtype(a.dtype, np.floating) else a, params)
    out = Path(args.out)
    checkpoint.save_model(out, half, config, overwrite=True)
    if raw["model_kind"] != "clip" and config.get("xf_width"):
        if not args.tokenizer:
            raise SystemExit("error: a text-conditional model needs --tokenizer (its sentencepiece model)")
        shutil.copy(args.tokenizer, out / "tokenizer.model")
    (out / "TRAINED.json").write_text(json.dumps({"run": str(args.run), "step": step, "model_kind": raw["model_kind"],
                                                  "seed": raw.get("seed"), "storage": "float16 (EMA params)"},
                                                 indent=1) + "\n")
    print(f"wrote {out}: step {step}, {sum(a.size for a in jax.tree.leaves(half))} params")


def inpaint_init(args) -> None:
    from glide_jax import checkpoint

    step, raw, params = newest_run_state(Path(args.run).absolute())
    config = model_config(raw)
    node = params
    for key in INPUT_CONV[:-1]:
        node = node[key]
    kernel = node[INPUT_CONV[-1]]
    if kernel.shape[2] != 3:
        raise SystemExit(f"error: expected a 3-channel input convolution, got kernel {kernel.shape}")
    # GLIDE's inpainting input is [x_t, masked image, mask] along channels; zero weights for the
    # extra four leave the base model's function unchanged at the start of fine-tuning.
    node[INPUT_CONV[-1]] = np.concatenate([kernel, np.zeros(kernel.shape[:2] + (4,) + kernel.shape[3:],
                                                            kernel.dtype)], axis=2)
    config["inpaint"] = True
    checkpoint.save_model(Path(args.out), params, config, overwrite=True)
    print(f"wrote {args.out}: base step {step}, input kernel {node[INPUT_CONV[-1]].shape}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model")
    m.add_argument("--run", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer")
    i = sub.add_parser("inpaint-init")
    i.add_argument("--run", required=True)
    i.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    (export_model if args.command == "model" else inpaint_init)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
