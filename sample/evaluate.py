"""Text-alignment evaluation of the bundled demo models on the captioned-shapes domain.

    python -m sample.evaluate --prompts 48 --seeds 2 --out out/eval

For each condition, N prompts × M seeds are sampled with the same noise, and every image is
read back by the shapes analyser (`demo.shapes.analyse`) and checked against its caption:
the colour and kind of every shape, the background, and for two-object prompts the relation of
the centroids. Held-out combinations (colour-shape pairs never shown in training) are scored as
colour and shape both right on the prompts that contain one. Conditions: classifier-free guidance
at scales 1 (the plain conditional model: no guidance), 3, 5 and 8; noised-CLIP guidance of the
conditional model; inpainting (one object of a two-object scene is masked out and the prompt asks
for a different one there; the kept region must stay put). The upsampler is compared with bicubic
upsampling of the same 32px renders, by PSNR and SSIM against the 64px renders.

Before any model runs, the analyser is checked on ground-truth renders of the same prompts: the
numbers mean nothing if it cannot read the domain itself. Proportions come with 95% Wilson
intervals (sound near 0 and 1, where the normal approximation is not); PSNR/SSIM means with a
normal-approximation interval over images. Each guided condition is also compared with no guidance
image by image (the same noise, so a paired difference of the all-checks rate, with its interval),
and CLIP guidance likewise with each classifier-free guidance scale. `--compare-sampler dpm++2m
--compare-steps 10,15,20` also samples CFG `--compare-scale` (3) with that sampler at each step
count from the same x_T, judged image by image against the default sampler's images.

Writes OUT/results.json, OUT/results.md and the guidance grid (default demo/guidance_grid.png:
one row per prompt, one column per guidance scale, then CLIP guidance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from demo import shapes
from sample import generate

CFG_SCALES = (1.0, 3.0, 5.0, 8.0)
UNGUIDED = "CFG 1 (no guidance)"
METRICS = ("colour", "shape", "background", "relation", "heldout", "all")
# Mean absolute change (uint8 levels) of the kept pixels below which inpainting "kept" them.
KEEP_TOLERANCE = 4.0
Z95 = 1.959963984540054


# -- statistics ------------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(flags) -> dict:
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "p": k / n if n else None, "lo": lo, "hi": hi}


def paired_difference(first, second, z: float = Z95) -> dict:
    """The difference p1 - p2 of two proportions measured on the same items (`first[i]` and
    `second[i]` judge item i under two conditions), with Bonett and Price's (2012) adjusted Wald
    interval for paired data: one pseudo-count added to each kind of disagreement. Only the items
    the two conditions disagree on say which is better; the pairing is what resolves a few points
    of difference that two separate intervals (each counting the shared noise) cannot. Newcombe's
    paired interval all but collapses to a point when the conditions never disagree; this one does not."""
    first, second = [bool(f) for f in first], [bool(f) for f in second]
    if len(first) != len(second):
        raise ValueError(f"paired flags must have the same length, got {len(first)} and {len(second)}")
    n = len(first)
    won = sum(f and not s for f, s in zip(first, second))
    lost = sum(s and not f for f, s in zip(first, second))
    result = {"n": n, "won": won, "lost": lost}
    if n == 0:
        return {**result, "diff": None, "lo": -1.0, "hi": 1.0}
    p_won, p_lost = (won + 1) / (n + 2), (lost + 1) / (n + 2)
    centre = p_won - p_lost
    half = z * math.sqrt(max(0.0, p_won + p_lost - centre ** 2) / (n + 2))
    return {**result, "diff": (won - lost) / n, "lo": max(-1.0, centre - half), "hi": min(1.0, centre + half)}


def mean_interval(values, z: float = Z95) -> dict:
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    half = float(z * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("inf")
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(len(values))}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur of (H, W) with reflect padding (the usual 11-tap SSIM window)."""
    t = np.arange(-radius, radius + 1)
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    p = np.pad(x, radius, mode="reflect")
    p = sum(k[i] * p[:, i:i + x.shape[1]] for i in range(len(k)))
    return sum(k[i] * p[i:i + x.shape[0], :] for i in range(len(k)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window σ=1.5, K1=0.01, K2=0.03) over RGB channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _gaussian_filter(x), _gaussian_filter(y)
        vx = _gaussian_filter(x * x) - mx * mx
        vy = _gaussian_filter(y * y) - my * my
        cov = _gaussian_filter(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(s.mean())
    return float(np.mean(values))


# -- prompts ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    caption: str
    scene: shapes.Scene          # a layout of the caption, for the ground-truth check
    heldout: bool                # contains a colour-shape pair never seen in training


def make_prompts(n: int, seed: int = 1234, heldout_fraction: float = 0.25) -> list[Prompt]:
    """`n` prompts: about `heldout_fraction` from the held-out split, the rest from the training
    distribution (a different seed from training's, though the caption set itself is small)."""
    n_heldout = int(round(n * heldout_fraction))
    prompts = []
    for i in range(n):
        split = "heldout" if i < n_heldout else "train"
        scene = shapes.scene_at(seed, i, split)
        caption = scene.caption(np.random.default_rng([seed, i]))
        prompts.append(Prompt(caption, scene, split == "heldout"))
    return prompts


def judge(prompt: Prompt, image: np.ndarray) -> dict:
    """The per-image checks (None where a check does not apply to this prompt)."""
    spec = shapes.parse_caption(prompt.caption)
    s = shapes.score(spec, shapes.analyse(image))
    return {"colour": s["colour"], "shape": s["shape"], "background": s["background"],
            "relation": s["relation"] if len(spec.objects) == 2 else None,
            "heldout": (s["colour"] and s["shape"]) if prompt.heldout else None,
            "all": s["all"]}


def summarise(judgements: list[dict]) -> dict:
    return {m: proportion([j[m] for j in judgements if j[m] is not None]) for m in METRICS}


def heldout_by_objects(prompts: list[Prompt], judgements: list[dict]) -> dict:
    """The held-out check split by how many shapes the caption names ("one", "two"): a pair never
    shown in training fails mostly beside another shape (demo/REPRODUCE.md). `judgements[i]`
    judges an image of `prompts[i]`."""
    split = {"one": [], "two": []}
    for prompt, j in zip(prompts, judgements, strict=True):
        if j["heldout"] is not None:
            split["one" if len(prompt.scene.shapes) == 1 else "two"].append(j["heldout"])
    return {n: proportion(flags) for n, flags in split.items()}


# -- models ----------------------------------------------------------------------------------------


def sample_condition(pipe, captions, seeds, *, respacing, guidance, scale=None,
                     inpaint_image=None, inpaint_mask=None, sampler="ddpm"):
    """uint8 (N*M, S, S, 3) base-model images: prompt-major, seed-minor, x_T of image (p, s) fixed by (p, s)."""
    import jax

    size = pipe.base_size
    # x_T of image (p, s) comes from (seed s, prompt p): every condition starts prompt p from the same
    # noise (a paired comparison), while different prompts get independent draws, so the images of
    # one condition are independent samples, as the confidence intervals assume.
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(s), p), (size, size, 3)))
                      for p in range(len(captions)) for s in seeds])
    options = dict(seed=int(seeds[0]), num_images_per_prompt=len(seeds), steps=respacing, sampler=sampler,
                   guidance=guidance, noise=noise, upsample=False)
    options["clip_guidance_scale" if guidance == "clip" else "guidance_scale"] = 1.0 if scale is None else scale
    if inpaint_image is not None:
        return pipe.inpaint(captions, list(inpaint_image), list(inpaint_mask), **options).arrays
    return pipe(captions, **options).arrays


# -- inpainting cases ------------------------------------------------------------------------------


def inpaint_cases(n: int, seed: int = 4321):
    """`n` two-object scenes whose second object is masked out and replaced, in the prompt, by a
    different colour-shape pair; returns (prompts, source images, keep masks) at 32 px."""
    rng = np.random.default_rng(seed)
    prompts, images, masks = [], [], []
    index = 0
    while len(prompts) < n:
        scene = shapes.scene_at(seed, index, "train")
        index += 1
        if len(scene.shapes) != 2:
            continue
        a, b = scene.shapes
        choices = [(c, k) for c, k in shapes.TRAIN_COMBINATIONS
                   if (c, k) != (b.colour, b.kind) and c not in (scene.background, a.colour, b.colour)]
        colour, kind = choices[int(rng.integers(len(choices)))]
        target = dataclasses.replace(scene, shapes=(a, dataclasses.replace(b, colour=colour, kind=kind)))
        caption = target.caption(rng)
        images.append(scene.render(32))
        masks.append(keep_mask(scene, 32))
        prompts.append(Prompt(caption, target, False))
    return prompts, np.stack(images), np.stack(masks)


def keep_mask(scene: shapes.Scene, size: int) -> np.ndarray:
    """(size, size, 1) float32, 1 = keep: the half-plane on the first object's side of the line
    midway between the two boxes along the relation's axis."""
    a, b = scene.shapes
    axis = 0 if scene.relation in ("left of", "right of") else 1
    a_first = scene.relation in ("left of", "above")
    if a_first:
        boundary = ((a.centre[axis] + a.size / 2) + (b.centre[axis] - b.size / 2)) / 2
    else:
        boundary = ((a.centre[axis] - a.size / 2) + (b.centre[axis] + b.size / 2)) / 2
    coords = (np.arange(size) + 0.5) / size
    along = coords[None, :] if axis == 0 else coords[:, None]
    keep = (along < boundary) if a_first else (along > boundary)
    return np.broadcast_to(keep, (size, size)).astype(np.float32)[..., None]


# -- report ----------------------------------------------------------------------------------------


def _pct(entry) -> str:
    if entry is None or entry["n"] == 0:
        return "–"
    return f"{100 * entry['p']:.1f} [{100 * entry['lo']:.0f}, {100 * entry['hi']:.0f}] (n={entry['n']})"


def _diff(entry) -> str:
    if entry["diff"] is None:
        return "–"
    return (f"{100 * entry['diff']:+.1f} [{100 * entry['lo']:+.1f}, {100 * entry['hi']:+.1f}] "
            f"({entry['won']} won, {entry['lost']} lost of {entry['n']})")


def markdown(results: dict) -> str:
    only = " held-out" if results.get("heldout_only") else ""
    lines = [f"Demo models, {results['prompts']}{only} prompts × {results['seeds']} seeds, "
             f"{results['respacing']} {results['sampler'].upper()} steps. Accuracy in %, [95% Wilson interval], n images.", "",
             "| condition | colour | shape | background | relation (2 objects) | held-out combos | all |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["conditions"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(entry["metrics"].get(m)) for m in METRICS) + " |")
    paired = [(name, entry["vs_unguided"]) for name, entry in results["conditions"].items()
              if "vs_unguided" in entry]
    if paired:
        lines += ["", "All checks, each condition minus no guidance, judged image by image (both start from the "
                      "same noise): points [95% paired interval, Bonett–Price] (images only it / only no guidance "
                      "got right): " + "; ".join(f"{name} {_diff(d)}" for name, d in paired) + "."]
    against_cfg = [(name, other, d) for name, entry in results["conditions"].items()
                   for other, d in entry.get("vs_cfg", {}).items()]
    if against_cfg:
        lines += ["", "All checks, CLIP guidance minus classifier-free guidance, image by image, as above: "
                  + "; ".join(f"{name} minus {other} {_diff(d)}" for name, other, d in against_cfg) + "."]
    samplers = [(name, entry["vs_default_sampler"]) for name, entry in results["conditions"].items()
                if "vs_default_sampler" in entry]
    if samplers:
        lines += ["", "All checks, another sampler minus the default one at the same scale, image by image, as "
                      "above: " + "; ".join(f"{name} minus {d['reference']} {_diff(d)}" for name, d in samplers) + "."]
    split = [(name, entry["heldout_by_objects"]) for name, entry in results["conditions"].items()
             if "heldout_by_objects" in entry]
    if split:
        lines += ["", "Held-out combos by the number of shapes in the caption, one / two (images right of n): "
                  + "; ".join(f"{name} {h['one']['k']}/{h['one']['n']}, {h['two']['k']}/{h['two']['n']}"
                              for name, h in split) + "."]
    ip = results.get("inpaint")
    if ip:
        lines += ["", f"Inpainting ({ip['n']} scenes × {results['seeds']} seeds, "
                      f"CFG {ip['guidance_scale']}): prompt followed (all checks) {_pct(ip['followed'])}; "
                      f"kept region unchanged (mean |Δ| ≤ {KEEP_TOLERANCE} levels) {_pct(ip['kept'])}, "
                      f"largest mean |Δ| {ip['max_kept_change']:.2f} levels."]
    up = results.get("upsample")
    if up:
        lines += ["", f"Upsampler 32→64 px on {up['n']} ground-truth renders ({up['respacing']} {up['sampler']} "
                      f"steps from t={up['start']}, as the CLI; the full chain from pure noise for comparison), "
                      "mean [95% interval]:", "",
                  "| method | PSNR (dB) | SSIM |", "|---|---|---|"]
        for method in ("model", "model_full_chain", "bicubic"):
            if method not in up:
                continue
            p, s = up[method]["psnr"], up[method]["ssim"]
            lines.append(f"| {method} | {p['mean']:.2f} [{p['lo']:.2f}, {p['hi']:.2f}] | "
                         f"{s['mean']:.4f} [{s['lo']:.4f}, {s['hi']:.4f}] |")
        d = up["psnr_gain"]
        lines.append(f"\nPaired PSNR gain of the model over bicubic: {d['mean']:.2f} dB [{d['lo']:.2f}, {d['hi']:.2f}].")
    gt = results["ground_truth"]
    lines += ["", f"Analyser on ground-truth 32 px renders of the same prompts: all checks "
                  f"{_pct(gt['all'])}."]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m sample.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=24, help="prompts per condition (N)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (M)")
    p.add_argument("--prompt-seed", type=int, default=1234,
                   help="seed of the prompt set (tune on another one than you report on)")
    p.add_argument("--heldout-only", action="store_true",
                   help="keep only the held-out part of the prompt set (its first quarter): a four times "
                        "larger sample of held-out pairs for the same sampling time")
    p.add_argument("--respacing", default=None, help="base steps (default: the CLI's demo default)")
    p.add_argument("--sampler", choices=generate.SAMPLER_CHOICES, default=None, help="default: the CLI's demo default")
    p.add_argument("--scales", default=",".join(str(s) for s in CFG_SCALES), help="CFG scales")
    p.add_argument("--clip-scale", type=float, default=None,
                   help="CLIP guidance scale (default: the CLI's demo default); 0 skips CLIP")
    p.add_argument("--inpaint", type=int, default=24, help="inpainting scenes (0 skips)")
    p.add_argument("--inpaint-scale", type=float, default=3.0, help="CFG scale for inpainting")
    p.add_argument("--upsample", type=int, default=16, help="upsampler test images (0 skips)")
    p.add_argument("--upsample-respacing", default=None, help="default: the CLI's demo default")
    p.add_argument("--upsample-sampler", choices=generate.SAMPLER_CHOICES, default=None, help="default: the CLI's demo default")
    p.add_argument("--upsample-start", type=int, default=None,
                   help="original timestep the upsampler starts from (999: pure noise); default: the CLI's demo default")
    p.add_argument("--compare-sampler", choices=generate.SAMPLER_CHOICES, default=None,
                   help="also sample CFG --compare-scale with this sampler at each of --compare-steps, from the "
                        "same x_T, and report its paired all-checks difference from the default sampler")
    p.add_argument("--compare-steps", default="20", help="comma list of step counts for --compare-sampler")
    p.add_argument("--compare-scale", type=float, default=3.0, help="CFG scale of the sampler comparison")
    p.add_argument("--grid", default="demo/guidance_grid.png", help="guidance grid image ('' skips)")
    p.add_argument("--grid-prompts", type=int, default=8)
    p.add_argument("--demo-dir", default=None,
                   help="a folder laid out as demo/ (base, base_inpaint, clip, upsample) to evaluate instead "
                        "of the bundled models, e.g. a candidate before it is bundled (default: demo/)")
    p.add_argument("--out", default="out/eval", help="directory for results.json and results.md")
    return p.parse_args(argv)


def _demo_pipeline(args):
    """The demo models as `python -m sample.generate` samples them; the options left unset take
    the models' own sampling defaults (demo/pipeline.json)."""
    from glide_jax.pipeline import FULL_CHAIN_START, Pipeline

    pipe = Pipeline(args.demo_dir or "demo")
    d = pipe.defaults
    args.respacing = args.respacing or d.steps
    args.sampler = args.sampler or d.sampler
    args.upsample_respacing = args.upsample_respacing or d.upsample_steps
    args.upsample_sampler = args.upsample_sampler or d.upsample_sampler
    if args.upsample_start is None:
        args.upsample_start = d.upsample_start
    if not 1 <= args.upsample_start <= FULL_CHAIN_START:
        raise SystemExit(f"error: --upsample-start must be in [1, {FULL_CHAIN_START}], got {args.upsample_start}")
    if args.clip_scale is None:
        args.clip_scale = d.clip_guidance_scale
    return pipe


def _prompt_set(args) -> list[Prompt]:
    if args.prompts < 1 or args.seeds < 1:
        raise SystemExit("error: --prompts and --seeds must be at least 1")
    prompts = make_prompts(args.prompts, args.prompt_seed)
    if args.heldout_only:
        # The held-out prompts come first, so each keeps its index and with it its starting noise.
        prompts = [p for p in prompts if p.heldout]
        if not prompts:
            raise SystemExit(f"error: --prompts {args.prompts} holds no held-out prompt (about a quarter "
                             "of the set is held out); ask for more")
    return prompts


def evaluate(args, log=print) -> dict:
    pipe = _demo_pipeline(args)

    scales = [float(s) for s in args.scales.split(",") if s]
    seeds = list(range(args.seeds))
    prompts = _prompt_set(args)
    captions = [p.caption for p in prompts]
    results = {"prompts": len(prompts), "heldout_only": args.heldout_only, "seeds": args.seeds,
               "prompt_seed": args.prompt_seed,
               "respacing": args.respacing, "sampler": args.sampler, "conditions": {}}

    # The analyser must read the domain itself before it can judge a model.
    gt = [judge(p, p.scene.render(32)) for p in prompts]
    results["ground_truth"] = summarise(gt)
    log(f"analyser on ground truth: all checks {_pct(results['ground_truth']['all'])}")
    if results["ground_truth"]["all"]["k"] != len(prompts):
        raise SystemExit("error: the analyser misreads ground-truth renders; model scores would be meaningless")

    grid_rows, all_checks = {}, {}

    def run(name, **kw):
        start = time.perf_counter()
        images = sample_condition(pipe, captions, seeds, **{"respacing": args.respacing, "sampler": args.sampler, **kw})
        judged = [prompts[i // len(seeds)] for i in range(len(images))]
        judgements = [judge(prompt, img) for prompt, img in zip(judged, images)]
        entry = {"metrics": summarise(judgements), "heldout_by_objects": heldout_by_objects(judged, judgements),
                 "seconds": time.perf_counter() - start, **kw}
        all_checks[name] = [j["all"] for j in judgements]
        if name != UNGUIDED and UNGUIDED in all_checks:
            # Every condition starts each image from the same noise, so it is judged image by image.
            entry["vs_unguided"] = paired_difference(all_checks[name], all_checks[UNGUIDED])
        results["conditions"][name] = entry
        log(f"{name}: " + ", ".join(f"{m} {_pct(entry['metrics'][m])}" for m in METRICS)
            + f" ({entry['seconds']:.0f} s)"
            + (f"; vs no guidance {_diff(entry['vs_unguided'])}" if "vs_unguided" in entry else ""))
        grid_rows[name] = images[::len(seeds)][:args.grid_prompts]   # seed 0 of the first prompts

    for scale in scales:
        run(UNGUIDED if scale == 1 else f"CFG {scale:g}", guidance="cfg", scale=scale)
    if args.compare_sampler:
        # Judged image by image against the default sampler's images of the same x_T: whether fewer
        # steps of another sampler keep the default's text alignment.
        reference = UNGUIDED if args.compare_scale == 1 else f"CFG {args.compare_scale:g}"
        if reference not in all_checks:
            run(reference, guidance="cfg", scale=args.compare_scale)
        for steps in [s for s in args.compare_steps.split(",") if s.strip()]:
            name = f"{reference} {args.compare_sampler} {steps.strip()} steps"
            run(name, guidance="cfg", scale=args.compare_scale, sampler=args.compare_sampler, respacing=steps.strip())
            entry = results["conditions"][name]
            entry["vs_default_sampler"] = {"reference": reference,
                                           **paired_difference(all_checks[name], all_checks[reference])}
            log(f"{name} minus {reference} ({args.respacing} {args.sampler} steps): "
                f"{_diff(entry['vs_default_sampler'])}")
    clip_scale = args.clip_scale
    if clip_scale > 0:
        clip_name = f"CLIP guidance {clip_scale:g}"
        run(clip_name, guidance="clip", scale=clip_scale)
        # The issue GLIDE settled: is CLIP guidance or classifier-free guidance the better one?
        results["conditions"][clip_name]["vs_cfg"] = {
            name: paired_difference(all_checks[clip_name], flags) for name, flags in all_checks.items()
            if name not in (clip_name, UNGUIDED)}

    if args.inpaint > 0:
        results["inpaint"] = evaluate_inpainting(pipe, args, seeds)
        log(f"inpainting: followed {_pct(results['inpaint']['followed'])}, kept {_pct(results['inpaint']['kept'])}")

    if args.upsample > 0:
        results["upsample"] = evaluate_upsampler(pipe, args.upsample, args.upsample_respacing,
                                                 args.upsample_sampler, args.upsample_start)
        u = results["upsample"]
        log(f"upsampler PSNR {u['model']['psnr']['mean']:.2f} dB vs bicubic {u['bicubic']['psnr']['mean']:.2f} dB")

    out_dir = Path(args.out)
    _write(out_dir, results, args.grid, grid_rows, captions)
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return results


def _write(out_dir: Path, results: dict, grid: str, grid_rows: dict, captions: list[str]) -> None:
    from sample.images import make_grid, save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    if grid and grid_rows:
        # Rows: prompts; columns: the conditions in order (CFG scales, then CLIP).
        columns = list(grid_rows)
        cells = np.stack([grid_rows[c][r] for r in range(len(grid_rows[columns[0]])) for c in columns])
        image = make_grid(cells, columns=len(columns))
        save_png(grid, np.kron(image, np.ones((2, 2, 1), np.uint8)))
        (out_dir / "grid_prompts.txt").write_text(
            "columns: " + " | ".join(columns) + "\n" + "\n".join(captions[:len(grid_rows[columns[0]])]) + "\n")


def evaluate_inpainting(pipe, args, seeds) -> dict:
    """Two-object scenes with one object masked out and another asked for there: is it drawn, and
    does the kept region stay put?"""
    ip_prompts, ip_images, ip_masks = inpaint_cases(args.inpaint)
    start = time.perf_counter()
    out = sample_condition(pipe, [p.caption for p in ip_prompts], seeds, respacing=args.respacing,
                           sampler=args.sampler, guidance="cfg", scale=args.inpaint_scale,
                           inpaint_image=ip_images.astype(np.float32) / 127.5 - 1, inpaint_mask=ip_masks)
    followed, kept, changes = [], [], []
    for i, img in enumerate(out):
        p = i // len(seeds)
        followed.append(judge(ip_prompts[p], img)["all"])
        keep = ip_masks[p][..., 0] > 0
        change = float(np.abs(img.astype(np.float64) - ip_images[p])[keep].mean())
        changes.append(change)
        kept.append(change <= KEEP_TOLERANCE)
    return {"n": args.inpaint, "guidance_scale": args.inpaint_scale,
            "followed": proportion(followed), "kept": proportion(kept),
            "max_kept_change": max(changes), "seconds": time.perf_counter() - start}


def evaluate_upsampler(pipe, n: int, respacing: str, sampler: str, start: int) -> dict:
    """The upsampler on `n` ground-truth renders at half its size against renders at its size, as
    the CLI runs it (`sampler` from timestep `start`) and, when that is a truncated chain, from pure
    noise too."""
    from PIL import Image

    from glide_jax.pipeline import FULL_CHAIN_START

    size = pipe.output_size
    scenes = [shapes.scene_at(99, i, "heldout" if i % 4 == 0 else "train") for i in range(n)]
    low = np.stack([s.render(size // 2) for s in scenes])
    high = np.stack([s.render(size) for s in scenes])
    captions = [s.caption(np.random.default_rng(i)) for i, s in enumerate(scenes)]
    outputs = {"bicubic": np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in low])}
    starts = {"model": start, "model_full_chain": FULL_CHAIN_START} if start < FULL_CHAIN_START else {"model": start}
    for name, first in starts.items():
        outputs[name] = pipe.upsample(low, captions, steps=respacing, sampler=sampler, start=first, temp=0.997).arrays
    result = {"n": n, "respacing": respacing, "sampler": sampler, "start": start}
    for name, images in outputs.items():
        result[name] = {"psnr": mean_interval([psnr(a, b) for a, b in zip(images, high)]),
                        "ssim": mean_interval([ssim(a, b) for a, b in zip(images, high)])}
    result["psnr_gain"] = mean_interval([psnr(a, h) - psnr(b, h)
                                         for a, b, h in zip(outputs["model"], outputs["bicubic"], high)])
    return result


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        evaluate(args)
    except Exception as err:
        return generate.handle_error(err, "sample.evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
