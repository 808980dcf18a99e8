"""The evaluation's statistics and scoring on inputs whose answers are known (no model needed)."""

import math

import numpy as np
import pytest

from demo import shapes
from sample import evaluate


def test_wilson_interval_known_values():
    z2 = evaluate.Z95 ** 2
    # 0 or n successes: one end is exact, the other is z^2 / (n + z^2) from it.
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert evaluate.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    # 5 of 10: the textbook interval, symmetric about 1/2.
    lo, hi = evaluate.wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 81 of 263 (Newcombe 1998's example of the Wilson interval: 0.2553 to 0.3662).
    assert evaluate.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    # Narrower with more trials at the same proportion, and always inside [0, 1].
    assert np.diff(evaluate.wilson_interval(50, 100)) < np.diff(evaluate.wilson_interval(5, 10))
    assert evaluate.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (1, -1)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="successes"):
        evaluate.wilson_interval(k, n)


def test_proportion_and_mean_interval():
    p = evaluate.proportion([True, False, True, True])
    assert (p["k"], p["n"], p["p"]) == (3, 4, 0.75)
    assert (p["lo"], p["hi"]) == pytest.approx(evaluate.wilson_interval(3, 4))
    m = evaluate.mean_interval([1.0, 3.0])
    half = evaluate.Z95 * math.sqrt(2.0) / math.sqrt(2)
    assert (m["mean"], m["lo"], m["hi"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half))


def test_paired_difference_counts_and_interval():
    # 10 both right, 6 only the first, 2 only the second, 2 neither.
    first = [True] * 10 + [True] * 6 + [False] * 2 + [False] * 2
    second = [True] * 10 + [False] * 6 + [True] * 2 + [False] * 2
    d = evaluate.paired_difference(first, second)
    assert (d["n"], d["won"], d["lost"]) == (20, 6, 2)
    assert d["diff"] == pytest.approx(0.2)
    assert d["lo"] < 0.2 < d["hi"]
    # Equal discordant counts: no difference, and the interval is symmetric about it.
    tie = evaluate.paired_difference(first[:16] + [False] * 6, second[:16] + [True] * 6)
    assert tie["diff"] == 0 and tie["lo"] == pytest.approx(-tie["hi"])
    # The same difference from fewer disagreements (pairs that agree more often) is surer.
    wide = evaluate.paired_difference([True] * 12 + [False] * 8, [False] * 6 + [True] * 10 + [False] * 4)
    narrow = evaluate.paired_difference([True] * 12 + [False] * 8, [True] * 10 + [False] * 10)
    assert wide["diff"] == narrow["diff"] == pytest.approx(0.1)
    assert narrow["hi"] - narrow["lo"] < wide["hi"] - wide["lo"]
    # Identical flags: the difference is exactly zero, yet 20 items cannot rule out a small one.
    same = evaluate.paired_difference([True, False] * 10, [True, False] * 10)
    z = evaluate.Z95
    assert same["diff"] == 0 and same["hi"] == pytest.approx(z * math.sqrt(2 / 22 / 22)) == -same["lo"]
    assert evaluate.paired_difference([], [])["diff"] is None
    with pytest.raises(ValueError, match="same length"):
        evaluate.paired_difference([True], [True, False])


def test_paired_difference_interval_covers_the_truth_about_95_percent():
    # Paired outcomes drawn with P(both, first only, second only, neither) = (.6, .15, .05, .2):
    # the true difference is 0.1, and a 95% interval must contain it about 95% of the time.
    rng = np.random.default_rng(0)
    hits = 0
    trials = 2000
    for _ in range(trials):
        cells = rng.choice(4, size=80, p=[0.6, 0.15, 0.05, 0.2])
        d = evaluate.paired_difference(cells <= 1, (cells == 0) | (cells == 2))
        hits += d["lo"] <= 0.1 <= d["hi"]
    assert 0.93 <= hits / trials <= 0.975, hits / trials


def test_psnr_and_ssim_known_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    b = a.astype(np.int16) + 1
    b = np.where(a == 255, 254, b).astype(np.uint8)      # every pixel off by exactly one level
    assert evaluate.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2))
    assert evaluate.psnr(a, a) == math.inf
    assert evaluate.ssim(a, a) == pytest.approx(1.0)
    # Structure destroyed (an independent noise image) scores far lower than a one-level offset.
    noise = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert evaluate.ssim(a, noise) < 0.1 < 0.9 < evaluate.ssim(a, b)


def test_judge_ground_truth_and_a_blank_image():
    prompts = evaluate.make_prompts(24)
    assert sum(p.heldout for p in prompts) == 6
    assert any(len(p.scene.shapes) == 2 for p in prompts) and any(len(p.scene.shapes) == 1 for p in prompts)
    for p in prompts:
        j = evaluate.judge(p, p.scene.render(32))
        assert all(v in (True, None) for v in j.values()), (p.caption, j)
        assert (j["heldout"] is None) != p.heldout
        assert (j["relation"] is None) == (len(p.scene.shapes) == 1)
    blank = np.full((32, 32, 3), 255, np.uint8)
    j = evaluate.judge(prompts[0], blank)
    assert not j["colour"] and not j["shape"] and not j["all"]


def test_summarise_counts_only_applicable_checks():
    judgements = [{"colour": True, "shape": False, "background": True, "relation": None, "heldout": None,
                   "all": False},
                  {"colour": True, "shape": True, "background": True, "relation": False, "heldout": True,
                   "all": False}]
    s = evaluate.summarise(judgements)
    assert (s["colour"]["k"], s["colour"]["n"]) == (2, 2)
    assert (s["relation"]["k"], s["relation"]["n"]) == (0, 1)
    assert (s["heldout"]["k"], s["heldout"]["n"]) == (1, 1)


def test_heldout_split_by_the_number_of_shapes_and_reported():
    prompts = evaluate.make_prompts(24)
    images = [p.scene.render(32) for p in prompts]
    blank = np.full((32, 32, 3), 255, np.uint8)
    # Every two-shape image blanked: their held-out checks fail, the one-shape ones pass.
    images = [blank if len(p.scene.shapes) == 2 else img for p, img in zip(prompts, images)]
    judgements = [evaluate.judge(p, img) for p, img in zip(prompts, images)]
    split = evaluate.heldout_by_objects(prompts, judgements)
    ones = sum(p.heldout and len(p.scene.shapes) == 1 for p in prompts)
    assert (split["one"]["k"], split["one"]["n"]) == (ones, ones) and ones > 0
    assert split["two"]["k"] == 0 and split["two"]["n"] == 6 - ones > 0
    results = {"prompts": 24, "seeds": 1, "respacing": "50", "sampler": "ddpm",
               "ground_truth": evaluate.summarise(judgements),
               "conditions": {"CFG 3": {"metrics": evaluate.summarise(judgements), "heldout_by_objects": split}}}
    assert f"CFG 3 {ones}/{ones}, 0/{6 - ones}." in evaluate.markdown(results)
    with pytest.raises(ValueError):
        evaluate.heldout_by_objects(prompts[:3], judgements)


def test_inpaint_cases_mask_out_the_replaced_object():
    prompts, images, masks = evaluate.inpaint_cases(6)
    assert images.shape == (6, 32, 32, 3) and masks.shape == (6, 32, 32, 1)
    for prompt, image, mask in zip(prompts, images, masks):
        target = prompt.scene
        source = shapes.analyse(image)
        keep = mask[..., 0] > 0
        assert 0 < keep.mean() < 1
        # The prompt asks for something else where the second object was...
        spec = shapes.parse_caption(prompt.caption)
        assert not shapes.score(spec, source)["all"]
        # ...the kept half holds all of the first object and none of the second.
        a, b = target.shapes
        only_a = shapes.Scene(target.background, (a,)).render(32)
        only_b = shapes.Scene(target.background, (b,)).render(32)
        bg = np.asarray(shapes.COLOURS[target.background], np.uint8)
        assert np.all(only_a[~keep] == bg) and np.all(only_b[keep] == bg)
        # The ground truth of the prompt passes, so the check can be met.
        assert evaluate.judge(prompt, target.render(32))["all"]


def test_a_missing_demo_dir_is_a_clear_error(tmp_path, capsys):
    args = ["--prompts", "1", "--scales", "3", "--clip-scale", "0", "--inpaint", "0", "--upsample", "0",
            "--grid", "", "--out", str(tmp_path / "out"), "--demo-dir", str(tmp_path / "candidate")]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'candidate'} is not a directory" in err and err.count("\n") == 1
    (tmp_path / "candidate").mkdir()   # a folder without the models: which one is missing, and where
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert f"no 'base' weights in {tmp_path / 'candidate'}" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_compare_sampler_is_judged_image_by_image_against_the_default(tmp_path):
    import json

    out = tmp_path / "out"
    args = ["--prompts", "2", "--scales", "3", "--clip-scale", "0", "--inpaint", "0", "--upsample", "0",
            "--grid", "", "--respacing", "2", "--compare-sampler", "dpm++2m", "--compare-steps", "2,3",
            "--out", str(out)]
    assert evaluate.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    for steps in ("2", "3"):
        entry = results["conditions"][f"CFG 3 dpm++2m {steps} steps"]
        assert entry["sampler"] == "dpm++2m" and entry["respacing"] == steps
        paired = entry["vs_default_sampler"]
        assert paired["reference"] == "CFG 3" and paired["n"] == 2
        assert paired["won"] + paired["lost"] <= paired["n"]
    assert "dpm++2m 3 steps minus CFG 3" in (out / "results.md").read_text()
