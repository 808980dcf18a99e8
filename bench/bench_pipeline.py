"""The Pipeline's cost over the stage functions it calls: the same work both ways, in one run.

    PYTHONPATH=. python bench/bench_pipeline.py --steps 10 --repeats 5

Runs the bundled demo base (classifier-free guidance, DDPM) for a batch of prompts through
`Pipeline.__call__` and through `stages.sample_base` with the tokens and params prepared by hand
(what `sample.generate` did before the Pipeline existed), after one warm-up call of each (so both
reuse their compiled program), alternating A/B so load drifts hit both alike. Prints the load
average and the median wall time of each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import jax

    from glide_jax import Pipeline, stages

    pipe = Pipeline.from_pretrained("demo", preload=("base",), compile_cache=False)
    prompts = ["a red circle on a white background"] * args.batch
    model = pipe.model("base")
    diffusion = pipe._diffusion(model.config, str(args.steps))

    def through_pipeline():
        return pipe(prompts, seed=0, steps=args.steps, upsample=False).arrays

    def through_stages():
        tokens, mask = model.tokenizer.tokenize_batch(prompts, model.config.text_ctx)
        uncond = model.tokenizer.pad_and_mask([], model.config.text_ctx)
        images = stages.sample_base(model.config, model.params, tokens, mask,
                                    jax.random.fold_in(jax.random.key(0), 0), diffusion=diffusion,
                                    guidance_scale=3.0, sampler="ddpm", uncond_tokens=uncond[0],
                                    uncond_mask=uncond[1], mesh=pipe.mesh)
        return stages.to_uint8(images)

    assert (through_pipeline() == through_stages()).all(), "the two paths must do the same work"
    times = {"pipeline": [], "stages": []}
    print(f"load average before: {os.getloadavg()}")
    for _ in range(args.repeats):
        for name, fn in (("pipeline", through_pipeline), ("stages", through_stages)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"load average after: {os.getloadavg()}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, values in times.items():
        print(f"{name:9s} median {med[name]:.3f} s  runs {', '.join(f'{v:.3f}' for v in values)}")
    print(f"pipeline / stages: {med['pipeline'] / med['stages']:.3f}")


if __name__ == "__main__":
    main()
