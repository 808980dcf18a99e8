"""Training: loss goes down, device count does not change the result, kill-and-resume continues
exactly, two processes train as one, non-finite losses stop the run, config errors name the key.

Everything that compiles runs in subprocesses that share one persistent compilation cache (the
kill/resume runs compile the same programs), with XLA's backend optimisation off: these tiny
programs run in milliseconds, and compiling them is what costs time on a CI machine.
"""

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PROJECT_ROOT

# The smallest U-Net the config allows (GroupNorm needs 32 channels), one text layer.
TINY_MODEL = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
              "attention_resolutions": "", "num_head_channels": 16, "text_ctx": 8, "xf_width": 16,
              "xf_layers": 1, "xf_heads": 2, "n_vocab": 40, "dropout": 0.1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def env(workdir):
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    })
    for name in ("GLIDE_COORDINATOR_ADDRESS", "GLIDE_NUM_PROCESSES", "GLIDE_PROCESS_ID"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def spm_model(workdir):
    from demo import shapes
    from glide_jax import tokenizers

    captions = [c for scene in itertools.islice(shapes.iter_scenes(0), 300) for c in scene.captions()]
    path = workdir / "shapes.model"
    tokenizers.SentencePieceTokenizer.train(captions, path, 40)
    return path


def run_config(spm_model, run_dir, **changes) -> dict:
    config = {
        "model": dict(TINY_MODEL),
        "model_kind": "base",
        "train_steps": 20,
        "seed": 3,
        "ema_rate": 0.9,
        "tokenizer": {"kind": "sentencepiece", "path": str(spm_model)},
        "data": {"source": {"kind": "shapes", "epoch_size": 48}, "prefetch": 0},
        "diffusion": {"steps": 100},
        "batch": {"global_size": 4},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 2},
        "checkpoint": {"dir": str(run_dir), "every": 5, "keep": 2},
        "log": {"every": 5},
    }
    for key, value in changes.items():
        node = config
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def first_batch(config_path: Path):
    """A Trainer for the config (closed again) and its first batch, as loaded and as the step takes it."""
    from train.run_config import load_run_config
    from train.train import Trainer

    trainer = Trainer(*load_run_config(config_path, []))
    try:
        loaded = next(trainer.loader)
        return trainer, loaded, trainer.host_batch(loaded)
    finally:
        trainer.close()


def train_cmd(config_path, *overrides):
    return [sys.executable, "-m", "train.train", "--config", str(config_path), *overrides]


def final_checksum(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("event") == "done"]
    assert done, f"no 'done' record in {run_dir / 'metrics.jsonl'}"
    return done[-1]["params_checksum"]


def saved_params(run_dir: Path, step: int, part: str = "params"):
    """The raw params (or `part` of the state) of checkpoint `step`, as numpy, read without the trainer."""
    import jax
    import orbax.checkpoint as ocp
    checkpointer = ocp.PyTreeCheckpointer()
    path = run_dir / str(step) / "state"
    metadata = checkpointer.metadata(path)
    metadata = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))[part]


def assert_trees_close(a, b, atol, what):
    import jax
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), what
    worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for (_, x), y in zip(leaves_a, leaves_b))
    assert worst <= atol, f"{what}: params differ by up to {worst} (tolerance {atol})"


# -- one process, several simulated devices ------------------------------------------------------

DEVICES_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from glide_jax import parallel, training
from glide_jax.config import ModelConfig
from glide_jax.diffusion import GaussianDiffusion
from demo.shapes import scene_at

model = ModelConfig.from_dict(json.loads({model!r}))
diffusion = GaussianDiffusion.create("squaredcos_cap_v2", 100)
task = training.diffusion_task(model, diffusion, "base", caption_dropout=0.2,
                               empty_tokens=np.ones(8, np.int32), empty_mask=np.zeros(8, bool))
opt_cfg = training.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.01, grad_clip=1.0, eps=1e-4)
optimizer = training.make_optimizer(opt_cfg)
rng = np.random.default_rng(0)
batch = {{"images": np.stack([scene_at(0, i).render(8) for i in range(8)]).astype(np.float32) / 127.5 - 1,
          "tokens": rng.integers(2, 40, (8, 8)).astype(np.int32),
          "mask": np.arange(8)[None, :] < rng.integers(1, 9, (8, 1))}}
out = {{}}
finals = {{}}
for name, mesh in [("one", parallel.make_mesh(devices=jax.devices()[:1])), ("eight", parallel.make_mesh()),
                   ("fsdp", parallel.make_mesh(fsdp=4))]:
    shardings = training.state_shardings(task, optimizer, mesh, fsdp_min_size=1024)
    state = training.create_train_state(task, optimizer, jax.random.key(7), mesh, fsdp_min_size=1024)
    step = training.make_train_step(task, optimizer, mesh, shardings, ema_rate=0.5,
                                    lr_schedule=training.learning_rate_schedule(opt_cfg))
    global_batch = parallel.shard_batch(batch, mesh)
    for _ in range({steps}):
        state, metrics = step(state, global_batch)
    out[name + "_loss"] = float(metrics["loss"])
    out[name + "_devices"] = len(state.params["unet"]["out_conv"]["kernel"].sharding.device_set)
    out[name + "_sharded_leaves"] = sum(not leaf.sharding.is_fully_replicated
                                        for leaf in jax.tree.leaves(state.params))
    finals[name] = parallel.to_host(state)
    if name == "one":
        evaluate = training.make_eval_loss(task, mesh)
        key = jax.random.key(11)
        before = float(evaluate(finals["one"].params, global_batch, key)["loss"])
        for _ in range(25):
            state, metrics = step(state, global_batch)
        out["eval_before"] = before
        out["eval_after"] = float(evaluate(state.params, global_batch, key)["loss"])

# Gradient accumulation: 2 microbatches of 4 rows on 4 devices give the one-batch update (no
# dropout in the model: its masks are the only draws made per microbatch).
still = training.diffusion_task(ModelConfig.from_dict(dict(json.loads({model!r}), dropout=0.0)), diffusion,
                                "base", caption_dropout=0.2, empty_tokens=np.ones(8, np.int32),
                                empty_mask=np.zeros(8, bool))
mesh4 = parallel.make_mesh(devices=jax.devices()[:4])
accumulated = {{}}
for accum in (1, 2):
    shardings = training.state_shardings(still, optimizer, mesh4)
    state = training.create_train_state(still, optimizer, jax.random.key(7), mesh4)
    step = training.make_train_step(still, optimizer, mesh4, shardings, ema_rate=0.5, grad_accum=accum)
    for _ in range(2):
        state, metrics = step(state, parallel.shard_batch(batch, mesh4))
    accumulated[accum] = (parallel.to_host(state.params), float(metrics["loss"]))

def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

for name in ("eight", "fsdp"):
    out[name + "_params_diff"] = max_diff(finals["one"].params, finals[name].params)
    out[name + "_ema_diff"] = max_diff(finals["one"].ema_params, finals[name].ema_params)
    out[name + "_opt_diff"] = max_diff(finals["one"].opt_state, finals[name].opt_state)
    out[name + "_step"] = int(finals[name].step)
out["accum_params_diff"] = max_diff(accumulated[1][0], accumulated[2][0])
out["accum_losses"] = [accumulated[1][1], accumulated[2][1]]
out["param_scale"] = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(finals["one"].params))
print(json.dumps(out))
"""


def test_same_update_on_one_eight_and_fsdp_devices_with_accumulation_and_loss_goes_down(env):
    script = DEVICES_SCRIPT.format(model=json.dumps(TINY_MODEL), steps=3)
    child_env = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env, capture_output=True, text=True,
                          timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["one_devices"] == 1 and out["eight_devices"] == 8 and out["fsdp_devices"] == 8
    assert out["one_sharded_leaves"] == 0 and out["eight_sharded_leaves"] == 0
    assert out["fsdp_sharded_leaves"] > 0, "fsdp=4 with fsdp_min_size=1024 should shard the large kernels"
    for name in ("eight", "fsdp"):
        assert out[name + "_step"] == 3
        # Only the order of float reductions differs. Adam divides by sqrt(v) + eps, which turns
        # reduction-order noise in near-zero gradients into steps of up to lr; eps=1e-4 bounds that
        # amplification so the comparison can be tight (3 steps of lr 1e-3 move params ~3e-3).
        assert out[name + "_params_diff"] < 2e-5, out
        assert out[name + "_ema_diff"] < 2e-5, out
        assert out[name + "_opt_diff"] < 1e-4, out
    assert out["eval_after"] < 0.8 * out["eval_before"], out
    assert out["accum_params_diff"] < 2e-5, out
    assert abs(out["accum_losses"][0] - out["accum_losses"][1]) < 1e-5, out


NEGATIVES_DEVICES_SCRIPT = """
import json
import jax, numpy as np
from glide_jax import parallel, training
from glide_jax.config import ModelConfig
from glide_jax.diffusion import GaussianDiffusion
from demo.shapes import scene_at

model = ModelConfig.from_dict(dict(json.loads({model!r}), dropout=0.0, conditioning={{"kind": "text_layout", "size": 2}}))
task = training.diffusion_task(model, GaussianDiffusion.create("squaredcos_cap_v2", 100), "base", caption_dropout=0.2,
                               empty_tokens=np.ones(8, np.int32), empty_mask=np.zeros(8, bool),
                               negative_weight=10.0, negative_from=0.0)
opt_cfg = training.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, eps=1e-4)
optimizer = training.make_optimizer(opt_cfg)
rng = np.random.default_rng(0)
n = 16
batch = {{"images": np.stack([scene_at(0, i).render(8) for i in range(n)]).astype(np.float32) / 127.5 - 1,
          "tokens": rng.integers(2, 40, (n, 8)).astype(np.int32), "mask": np.ones((n, 8), bool),
          "negative_tokens": rng.integers(2, 40, (n, 8)).astype(np.int32), "negative_mask": np.ones((n, 8), bool),
          "has_negative": rng.random(n) < 0.5}}
finals, out = {{}}, {{}}
for name, mesh in [("one", parallel.make_mesh(devices=jax.devices()[:1])), ("eight", parallel.make_mesh())]:
    state = training.create_train_state(task, optimizer, jax.random.key(7), mesh)
    step = training.make_train_step(task, optimizer, mesh, training.state_shardings(task, optimizer, mesh), ema_rate=0.5)
    for _ in range(3):
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
    finals[name] = parallel.to_host(state.params)
    out[name] = {{k: float(v) for k, v in metrics.items() if k.startswith("negative")}}
out["params_diff"] = max(float(np.max(np.abs(a - b)))
                         for a, b in zip(jax.tree.leaves(finals["one"]), jax.tree.leaves(finals["eight"])))
out["devices"] = len(jax.devices())
print(json.dumps(out))
"""


def test_negative_term_gives_the_same_update_on_one_and_eight_devices(env):
    # The compared rows are chosen over the whole batch, which eight devices hold in pieces.
    script = NEGATIVES_DEVICES_SCRIPT.format(model=json.dumps(TINY_MODEL))
    child_env = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env, capture_output=True, text=True,
                          timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert out["one"]["negative_compared"] == out["eight"]["negative_compared"] > 0
    assert out["one"]["negative"] == pytest.approx(out["eight"]["negative"], rel=1e-4)
    assert out["params_diff"] < 2e-5, out


# -- the training CLI ------------------------------------------------------------------------------

def _shapes_folder(root: Path, count: int) -> Path:
    """`count` rendered shapes scenes as png + txt, and one record whose image is corrupt."""
    from PIL import Image

    from demo import shapes

    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene = shapes.scene_at(1, index)
        Image.fromarray(scene.render(8)).save(root / f"{index:03d}.png")
        (root / f"{index:03d}.txt").write_text("\n".join(scene.captions()))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("never read")
    return root


def test_killed_run_resumes_to_the_same_params(env, spm_model, workdir):
    steps = 40
    reference_dir, killed_dir = workdir / "uninterrupted", workdir / "killed"
    # A shuffled source with a bad record, so the restored position covers the epoch order and the
    # refilled slot; the killed run makes its batches in a grain worker process, the reference inline.
    data = {"source": {"kind": "folder", "path": str(_shapes_folder(workdir / "resume_data", 23))},
            "prefetch": 2, "workers": 0}
    reference = write_config(workdir / "uninterrupted.json",
                             run_config(spm_model, reference_dir, train_steps=steps, data=data))
    proc = subprocess.run(train_cmd(reference), env=env, capture_output=True, text=True, timeout=600,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    killed = write_config(workdir / "killed.json", run_config(spm_model, killed_dir, train_steps=steps,
                                                              data=dict(data, workers=1)))
    child = subprocess.Popen(train_cmd(killed), env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # A checkpoint directory gets its final name only once complete (orbax renames it).
    while not (killed_dir / "10").is_dir() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (killed_dir / str(steps)).exists()

    proc = subprocess.run(train_cmd(killed), env=env, capture_output=True, text=True, timeout=600,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    # Same program, same inputs, same order: bit-identical, not merely close.
    for part in ("params", "ema_params"):   # the EMA's rate depends on the step, so the step must resume too
        assert_trees_close(saved_params(reference_dir, steps, part), saved_params(killed_dir, steps, part), 0.0,
                           f"resumed vs uninterrupted {part}")
    assert final_checksum(killed_dir) == final_checksum(reference_dir)
    # The data positions agree too: grain's state went through the checkpoint and came back.
    positions = [json.loads((d / str(steps) / "data" / "metadata").read_text())["processes"][0]
                 for d in (reference_dir, killed_dir)]
    assert positions[0]["batches"] == positions[1]["batches"] == steps
    assert positions[0]["stats"] == positions[1]["stats"] and positions[0]["stats"]["skipped"]["corrupt_image"] > 0
    assert positions[1]["workers"] == 1 and positions[1]["grain"] is not None
    first = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in first if "loss" in r]
    assert losses[-1] < losses[0], f"loss did not go down over {steps} steps: {losses}"


def test_two_processes_train_together_and_agree(env, spm_model, workdir):
    run_dir = workdir / "two_processes"
    config = write_config(workdir / "two.json", run_config(spm_model, run_dir, train_steps=6,
                                                          checkpoint__every=3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for pid in range(2):
        child_env = dict(env, GLIDE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", GLIDE_NUM_PROCESSES="2",
                         GLIDE_PROCESS_ID=str(pid))
        children.append(subprocess.Popen(train_cmd(config), env=child_env, cwd=PROJECT_ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err[-4000:]
    checksums = []
    for _, err in outputs:
        assert "2 devices, 2 processes, global batch 4 (2 per process)" in err, err[-2000:]
        line = [l for l in err.splitlines() if "params checksum" in l][-1]
        checksums.append(float(line.rsplit(" ", 1)[1]))
    assert checksums[0] == checksums[1], f"processes disagree on the params: {checksums}"
    saved = json.loads((run_dir / "6" / "data" / "metadata").read_text())
    assert [p["host_index"] for p in saved["processes"]] == [0, 1]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(env, spm_model, workdir):
    run_dir = workdir / "diverging"
    config = write_config(workdir / "diverging.json", run_config(
        spm_model, run_dir, train_steps=8, optimizer={"learning_rate": 1e30, "grad_clip": 0.0},
        checkpoint__every=1, checkpoint__keep=20, log__every=1))
    proc = subprocess.run(train_cmd(config), env=env, capture_output=True, text=True, timeout=600,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 3, proc.stderr[-4000:]
    message = [l for l in proc.stderr.splitlines() if "non-finite loss at step" in l]
    assert message, proc.stderr[-4000:]
    bad_step = int(message[0].split("non-finite loss at step ")[1].split(":")[0])
    assert 2 <= bad_step <= 8
    assert f"last good checkpoint: step {bad_step - 1}" in message[0]
    saved = sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit())
    assert saved == list(range(1, bad_step)), saved


def test_config_errors_name_the_key(env, spm_model, workdir):
    from glide_jax.config import ConfigError
    from train.run_config import RunConfig, load_run_config

    base = run_config(spm_model, workdir / "unused")
    cases = {
        "optimizer.learning_rat": ({"optimizer": {"learning_rat": 1.0}}, "optimizer.learning_rat"),
        "checkpoint.every": ({"checkpoint": {"dir": "x", "every": 0}}, "checkpoint.every"),
        "batch": ({"batch": {"global_size": 4, "per_device_size": 2}}, "batch.global_size"),
        "log.every type": ({"log": {"every": "often"}}, "log.every"),
        "model_kind": ({"model_kind": "video"}, "model_kind"),
        "model option": ({"model": dict(TINY_MODEL, num_channel=3)}, "num_channel"),
        "schedule": ({"optimizer": {"schedule": "cosine"}}, "optimizer.decay_steps"),
    }
    for name, (change, expected) in cases.items():
        values = json.loads(json.dumps(base))
        for key, value in change.items():
            values[key] = dict(values[key], **value) if isinstance(value, dict) and key != "model" else value
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            cfg = RunConfig.from_dict(values)
            if name == "model option":
                from glide_jax.config import ModelConfig
                ModelConfig.from_dict(cfg.model, source="model")

    path = write_config(workdir / "base.json", base)
    with pytest.raises(ConfigError, match=r"optimizer\.b1"):
        load_run_config(path, ["optimizer.b1=1.5"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_run_config(path, ["optimizer.b1"])

    # Through the CLI: exit code 2 and the key in the message, before any compilation.
    proc = subprocess.run(train_cmd(path, "checkpoint.kep=3"), env=env, capture_output=True, text=True,
                          timeout=120, cwd=PROJECT_ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "checkpoint.kep" in proc.stderr
    proc = subprocess.run(train_cmd(path, "model.xf_heads=3"), env=env, capture_output=True, text=True,
                          timeout=120, cwd=PROJECT_ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "xf_heads" in proc.stderr


def test_fine_tuning_starts_from_the_given_checkpoint(env, spm_model, workdir, caplog):
    import jax

    from glide_jax import checkpoint
    from glide_jax.config import ConfigError, ModelConfig
    from glide_jax.unet import param_shapes
    from train.train import Trainer
    from train.run_config import load_run_config

    model = ModelConfig.from_dict(TINY_MODEL)
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), param_shapes(model))
    init_dir = checkpoint.save_model(workdir / "released", params, model.to_dict())
    run_dir = workdir / "finetune"
    config = run_config(spm_model, run_dir, train_steps=1)
    del config["model"]           # taken from the checkpoint
    path = write_config(workdir / "finetune.json", config)
    # Warm-up makes step 1's learning rate 0, so its checkpoint must hold the given params exactly.
    proc = subprocess.run(train_cmd(path, "--init-from", str(init_dir)), env=env, capture_output=True,
                          text=True, timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fine-tuning from" in proc.stderr and "the output head's meaning changes" not in proc.stderr
    assert_trees_close(params, saved_params(run_dir, 1), 0.0, "fine-tuned step 1 vs the initial checkpoint")

    # A checkpoint of another architecture is refused, naming the parameter that differs.
    other = checkpoint.save_model(workdir / "other", jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), param_shapes(ModelConfig.from_dict(dict(TINY_MODEL, xf_width=32)))),
        dict(TINY_MODEL, xf_width=32))
    cfg, raw = load_run_config(path, [f"init_from={other}", f"model={json.dumps(TINY_MODEL)}",
                                      f"checkpoint.dir={workdir / 'refused'}"])
    with pytest.raises(ConfigError, match="init params: parameter .* has shape"):
        Trainer(cfg, raw)

    # Turning an eps checkpoint into a v model is allowed (the demo base was made so), and said.
    cfg, raw = load_run_config(path, [f"init_from={other}", f"model={json.dumps(dict(TINY_MODEL, prediction='v'))}",
                                      f"checkpoint.dir={workdir / 'to_v'}"])
    with caplog.at_level(logging.WARNING, logger="glide_jax.train"), pytest.raises(ConfigError):
        Trainer(cfg, raw)
    assert f"init_from {other} predicts eps but this run trains prediction=v" in caplog.text


@pytest.mark.parametrize("kind", ["base", "upsample", "inpaint", "upsample_inpaint", "clip"])
def test_every_model_kind_builds_a_loss_over_its_batch(kind):
    import jax

    from glide_jax import training
    from glide_jax.clip import ClipConfig
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    if kind == "clip":
        task = training.clip_task(ClipConfig(image_size=8, patch_size=4, max_text_len=8, n_embd=16,
                                             n_head_state_text=8, n_head_text=2, n_xf_blocks_text=1,
                                             n_head_state_image=8, n_head_image=2, n_xf_blocks_image=1,
                                             n_timesteps=100, n_vocab=64))
    else:
        model = ModelConfig.from_dict(dict(TINY_MODEL, image_size=16, super_res="upsample" in kind,
                                           inpaint="inpaint" in kind))
        task = training.diffusion_task(model, GaussianDiffusion.create("linear", 100), kind,
                                       empty_tokens=np.ones(8), empty_mask=np.zeros(8, bool))
    optimizer = training.make_optimizer(training.OptimizerConfig())
    state = training.abstract_state(task, optimizer)
    spec = task.batch_spec(4)
    expected = {"base": {"images", "tokens", "mask"}, "upsample": {"images", "tokens", "mask", "low_res"},
                "inpaint": {"images", "tokens", "mask", "inpaint_mask"},
                "upsample_inpaint": {"images", "tokens", "mask", "low_res", "inpaint_mask"},
                "clip": {"images", "clip_tokens", "clip_text_len"}}[kind]
    assert set(spec) == expected
    if "low_res" in spec:
        assert spec["low_res"].shape == (4, 4, 4, 3)
    loss, grads = jax.eval_shape(jax.value_and_grad(lambda p, b: task.loss(p, b, jax.random.key(0))[0]),
                                 state.params, spec)
    assert loss.shape == () and loss.dtype == np.float32
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)


def test_restart_step_runs_the_schedule_again_from_that_step():
    from glide_jax import training
    from glide_jax.config import ConfigError

    args = dict(learning_rate=1e-3, schedule="cosine", warmup_steps=10, decay_steps=90, min_learning_rate=1e-5)
    once = training.learning_rate_schedule(training.OptimizerConfig(**args))
    again = training.learning_rate_schedule(training.OptimizerConfig(**args, restart_step=500))
    for step in (0, 5, 10, 50, 100, 499):
        assert float(again(step)) == pytest.approx(float(once(step)))
    assert float(again(499)) == pytest.approx(1e-5)          # the first schedule has run out...
    for offset in (0, 5, 10, 50, 100, 300):                   # ...and begins again, warm-up first
        assert float(again(500 + offset)) == pytest.approx(float(once(offset)))
    assert float(again(550)) > 0.4e-3
    with pytest.raises(ConfigError, match="optimizer.restart_step must be >= 0"):
        training.OptimizerConfig(**args, restart_step=-1)


def test_wrong_model_kind_for_the_model_config_is_refused():
    from glide_jax import training
    from glide_jax.config import ConfigError, ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    with pytest.raises(ConfigError, match="model_kind 'upsample' needs model.super_res=True"):
        training.diffusion_task(ModelConfig.from_dict(TINY_MODEL), GaussianDiffusion.create("linear", 100),
                                "upsample", empty_tokens=np.ones(8), empty_mask=np.zeros(8, bool))


def test_bfloat16_compute_keeps_float32_master_params():
    import jax

    from glide_jax import training
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    model = ModelConfig.from_dict(TINY_MODEL)
    counts = {}
    for dtype in ("float32", "bfloat16"):
        task = training.diffusion_task(model, GaussianDiffusion.create("linear", 100), "base", compute_dtype=dtype,
                                       empty_tokens=np.ones(8), empty_mask=np.zeros(8, bool))
        state = training.abstract_state(task, training.make_optimizer(training.OptimizerConfig()))
        assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
        jaxpr = str(jax.make_jaxpr(lambda p, b: task.loss(p, b, jax.random.key(0)))(state.params, task.batch_spec(2)))
        products = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line or "dot_general" in line]
        counts[dtype] = (len(products), sum("bf16" in line for line in products))
    assert counts["float32"][1] == 0
    # All but the float32 output head run in bfloat16.
    assert counts["bfloat16"][1] >= counts["bfloat16"][0] - 2 > 0, counts


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting_scales_only_the_mean_loss_by_its_capped_snr_weight(prediction):
    import jax

    from glide_jax import training
    from glide_jax.config import ConfigError, ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    model = ModelConfig.from_dict({**TINY_MODEL, "prediction": prediction})
    diffusion = GaussianDiffusion.create("squaredcos_cap_v2", 100, prediction=prediction)
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    gamma = 2.0
    # x_0 errors weigh min(SNR, gamma) (eps) or min(SNR, gamma) + 1 (v: its floor of 1 at high noise kept).
    expected = np.minimum(snr, gamma) / snr if prediction == "eps" else (np.minimum(snr, gamma) + 1) / (snr + 1)
    tasks = {g: training.diffusion_task(model, diffusion, "base", min_snr_gamma=g, caption_dropout=0.0)
             for g in (0.0, gamma, 1e12)}
    params = tasks[0.0].init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32),
             "tokens": rng.integers(0, 16, (1, 8)).astype(np.int32), "mask": np.ones((1, 8), bool)}
    weights = []
    for seed in range(12):
        (plain, terms), (weighted, _), (huge, _) = (
            tasks[g].loss(params, batch, jax.random.key(seed)) for g in (0.0, gamma, 1e12))
        assert float(plain) == pytest.approx(float(terms["mse"] + terms["vb"]), rel=1e-6)
        assert float(huge) == pytest.approx(float(plain), rel=1e-6)   # gamma above every SNR: unweighted
        weight = (float(weighted) - float(terms["vb"])) / float(terms["mse"])
        # One batch row, so the weight is that of the row's timestep.
        assert np.min(np.abs(expected - weight)) < 1e-4, weight
        weights.append(weight)
    assert min(weights) < 0.9 and max(weights) == pytest.approx(1.0, abs=1e-4)  # low-noise steps down-weighted

    with pytest.raises(ConfigError, match="min_snr_gamma must be >= 0"):
        training.diffusion_task(model, diffusion, "base", min_snr_gamma=-1.0, caption_dropout=0.0)
    other = "v" if prediction == "eps" else "eps"
    with pytest.raises(ConfigError, match=f"the model predicts '{prediction}' .* built for '{other}'"):
        training.diffusion_task(model, GaussianDiffusion.create("squaredcos_cap_v2", 100, prediction=other), "base",
                                caption_dropout=0.0)


def test_high_noise_fraction_draws_that_share_of_timesteps_from_the_noisiest_part_only():
    import jax

    from glide_jax import training

    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), np.arange(4000))
    uniform = np.asarray(training.draw_timesteps(keys, 1000))
    assert uniform.min() < 50 and uniform.max() > 950 and abs(np.mean(uniform >= 950) - 0.05) < 0.015
    mixed = np.asarray(training.draw_timesteps(keys, 1000, high_noise_fraction=0.3, high_noise_from=0.95))
    # The examples not moved keep their uniform draw; the moved ones land in [950, 1000).
    moved = mixed != uniform
    assert np.all(mixed[moved] >= 950) and mixed.max() <= 999
    assert abs(np.mean(mixed >= 950) - (0.3 + 0.7 * 0.05)) < 0.03
    everything = np.asarray(training.draw_timesteps(keys, 1000, high_noise_fraction=1.0, high_noise_from=0.999))
    assert np.all(everything == 999)


def test_high_noise_option_leaves_the_loss_of_older_runs_unchanged_and_is_validated():
    import jax

    from glide_jax import training
    from glide_jax.config import ConfigError, ModelConfig
    from glide_jax.diffusion import GaussianDiffusion
    from train.run_config import RunConfig

    model = ModelConfig.from_dict(TINY_MODEL)
    diffusion = GaussianDiffusion.create("squaredcos_cap_v2", 100)
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
             "tokens": rng.integers(0, 16, (4, 8)).astype(np.int32), "mask": np.ones((4, 8), bool)}
    plain = training.diffusion_task(model, diffusion, "base", caption_dropout=0.0)
    off = training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, high_noise_fraction=0.0,
                                  high_noise_from=0.5)
    on = training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, high_noise_fraction=1.0,
                                 high_noise_from=0.99)
    params = plain.init(jax.random.key(0))
    key = jax.random.key(3)
    assert float(off.loss(params, batch, key)[0]) == float(plain.loss(params, batch, key)[0])
    assert float(on.loss(params, batch, key)[0]) != float(plain.loss(params, batch, key)[0])

    with pytest.raises(ConfigError, match="high_noise_fraction must be in"):
        training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, high_noise_fraction=1.5)
    with pytest.raises(ConfigError, match="high_noise_from must be in"):
        RunConfig.from_dict({"model": TINY_MODEL, "high_noise_from": 1.0})


def test_negative_captions_add_a_term_that_asks_the_own_caption_to_explain_the_image_better():
    import jax

    from glide_jax import training
    from glide_jax.config import ConfigError, ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    model = ModelConfig.from_dict({**TINY_MODEL, "dropout": 0.0})
    diffusion = GaussianDiffusion.create("squaredcos_cap_v2", 100)
    rng = np.random.default_rng(0)
    n = 8
    batch = {"images": rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32),
             "tokens": rng.integers(0, 16, (n, 8)).astype(np.int32), "mask": np.ones((n, 8), bool),
             "negative_tokens": rng.integers(0, 16, (n, 8)).astype(np.int32), "negative_mask": np.ones((n, 8), bool),
             "has_negative": np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)}
    plain = training.diffusion_task(model, diffusion, "base", caption_dropout=0.0)
    task = training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, negative_weight=2.0, negative_from=0.0)
    assert set(task.batch_spec(n)) - set(plain.batch_spec(n)) == {"negative_tokens", "negative_mask", "has_negative"}
    # Random params: a fresh model's zero output layer would make every caption's prediction the same.
    params = jax.tree.map(lambda leaf: (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32),
                          plain.init(jax.random.key(0)))
    key = jax.random.key(3)
    own_loss, own_terms = plain.loss(params, {k: batch[k] for k in plain.batch_spec(n)}, key)
    compared = min(int(batch["has_negative"].sum()), int(n * training.NEGATIVE_SHARE))

    loss, terms = task.loss(params, batch, key)
    assert float(terms["negative_compared"]) == compared / n
    assert float(terms["mse"]) == pytest.approx(float(own_terms["mse"]), rel=1e-6)
    assert float(loss) == pytest.approx(float(own_loss) + 2.0 * float(terms["negative"]), rel=1e-6)
    assert float(terms["negative"]) > 0
    # Its gradient reaches the params: the negative caption's error is pushed up, the own one's down.
    grads = jax.grad(lambda p: task.loss(p, batch, key)[0])(params)
    own_grads = jax.grad(lambda p: plain.loss(p, {k: batch[k] for k in plain.batch_spec(n)}, key)[0])(params)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(own_grads))) > 1e-4

    # The own caption as its own negative: no gap, so the term is softplus(0) on each compared row.
    same = {**batch, "negative_tokens": batch["tokens"]}
    _, same_terms = task.loss(params, same, key)
    assert float(same_terms["negative"]) == pytest.approx(training.NEGATIVE_TEMPERATURE * np.log(2) * compared / n,
                                                          rel=1e-3)
    # No negatives (or none at a late enough timestep): exactly the plain loss.
    none = {**batch, "has_negative": np.zeros(n, bool)}
    assert float(task.loss(params, none, key)[0]) == float(own_loss)
    late = training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, negative_weight=2.0, negative_from=0.999)
    assert sum(float(late.loss(params, batch, jax.random.key(seed))[1]["negative_compared"]) for seed in range(4)) < 0.2
    # Dropped captions are not compared: their prediction is the unconditional one.
    dropping = training.diffusion_task(model, diffusion, "base", caption_dropout=0.999, empty_tokens=np.zeros(8, np.int32),
                                       empty_mask=np.zeros(8, bool), negative_weight=2.0, negative_from=0.0)
    assert float(dropping.loss(params, batch, key)[1]["negative_compared"]) == 0.0

    with pytest.raises(ConfigError, match="negative_weight must be >= 0"):
        training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, negative_weight=-1.0)
    with pytest.raises(ConfigError, match="negative_from must be in"):
        training.diffusion_task(model, diffusion, "base", caption_dropout=0.0, negative_weight=1.0, negative_from=1.0)
    untexted = ModelConfig.from_dict({**TINY_MODEL, "xf_width": 0})
    with pytest.raises(ConfigError, match="negative_weight > 0 needs a text-conditional model"):
        training.diffusion_task(untexted, diffusion, "base", caption_dropout=0.0, negative_weight=1.0)


def test_a_run_with_negative_weight_tokenizes_the_negative_captions(spm_model, workdir):
    import jax
    from PIL import Image

    from glide_jax.config import ConfigError
    from train.run_config import load_run_config
    from train.train import Trainer

    path = write_config(workdir / "negatives.json", run_config(spm_model, workdir / "negatives", negative_weight=1.0))
    trainer, loaded, batch = first_batch(path)
    assert batch["has_negative"].tolist() == [bool(c) for c in loaded["negative_captions"]]
    expected, _ = trainer.tokenizer.tokenize_batch(loaded["negative_captions"], TINY_MODEL["text_ctx"])
    np.testing.assert_array_equal(batch["negative_tokens"], expected)
    loss, metrics = trainer.task.loss(trainer.state.params, batch, jax.random.key(0))
    assert {"negative", "negative_won", "negative_compared"} <= set(metrics)

    folder = workdir / "folder_images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_text("a caption")
    path = write_config(workdir / "negatives_folder.json", run_config(
        spm_model, workdir / "negatives_folder", negative_weight=1.0, data__source={"kind": "folder", "path": str(folder)}))
    with pytest.raises(ConfigError, match="data: negative captions were asked for, but a FolderSource has none"):
        Trainer(*load_run_config(path, []))


def test_a_second_run_on_a_directory_in_use_is_refused_and_names_the_holder(env, spm_model, workdir):
    from train.train import EXIT_BUSY, lock_run_dir

    run_dir = workdir / "busy"
    config = write_config(workdir / "busy.json", run_config(spm_model, run_dir, train_steps=2))
    held = lock_run_dir(run_dir)
    try:
        proc = subprocess.run(train_cmd(config), env=env, capture_output=True, text=True, timeout=600,
                              cwd=PROJECT_ROOT)
    finally:
        held.close()
    assert proc.returncode == EXIT_BUSY, proc.stderr[-4000:]
    assert f"checkpoint.dir {run_dir} is in use by another training run (pid {os.getpid()}" in proc.stderr
    assert not any(p.name.isdigit() for p in run_dir.iterdir())
    # Released (as when its process ends, killed or not), the directory is free again.
    lock_run_dir(run_dir).close()


@pytest.mark.parametrize("debias", [True, False])
def test_ema_is_the_bias_corrected_average_of_the_run_s_params_or_the_plain_one(debias):
    import jax

    from glide_jax import parallel, training
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    task = training.diffusion_task(ModelConfig.from_dict(TINY_MODEL), GaussianDiffusion.create("linear", 100), "base",
                                   empty_tokens=np.ones(8), empty_mask=np.zeros(8, bool))
    optimizer = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    shardings = training.state_shardings(task, optimizer, mesh)
    state = training.create_train_state(task, optimizer, jax.random.key(3), mesh)
    rate = 0.8
    step = training.make_train_step(task, optimizer, mesh, shardings, ema_rate=rate, ema_debias=debias, donate=False)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({"images": rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
                                  "tokens": rng.integers(2, 40, (4, 8)).astype(np.int32),
                                  "mask": np.ones((4, 8), bool)}, mesh)
    trajectory = [parallel.to_host(state.params)]
    for _ in range(4):
        state, _ = step(state, batch)
        trajectory.append(parallel.to_host(state.params))
    n = len(trajectory) - 1
    weights = [(1 - rate) * rate ** (n - k) for k in range(1, n + 1)]
    if debias:      # the starting params (random here) have no weight at all
        weights = [0.0] + [w / (1 - rate ** n) for w in weights]
    else:
        weights = [rate ** n] + weights
    assert sum(weights) == pytest.approx(1.0)
    expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)), *trajectory)
    got = parallel.to_host(state.ema_params)
    assert_trees_close(expected, got, 1e-6, "EMA")
    # Not vacuous: the starting params are far from the run's average.
    with pytest.raises(AssertionError):
        assert_trees_close(trajectory[0], got, 1e-3, "EMA against the starting params")
    assert float(training.ema_step_rate(rate, 1)) == 0.0
    assert float(training.ema_step_rate(rate, 10_000)) == pytest.approx(rate)


def test_frozen_parameters_keep_their_values_and_the_rest_trains():
    import jax
    import optax

    from glide_jax import parallel, training
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import GaussianDiffusion

    task = training.diffusion_task(ModelConfig.from_dict(TINY_MODEL), GaussianDiffusion.create("linear", 100), "base",
                                   empty_tokens=np.ones(8), empty_mask=np.zeros(8, bool))
    frozen = ["text_encoder/resblocks_0", "text_encoder/token_embedding"]
    optimizer = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-2, frozen=frozen))
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    shardings = training.state_shardings(task, optimizer, mesh)
    state = training.create_train_state(task, optimizer, jax.random.key(3), mesh)
    start = parallel.to_host(state.params)
    step = training.make_train_step(task, optimizer, mesh, shardings, frozen=frozen, donate=False)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({"images": rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
                                  "tokens": rng.integers(2, 40, (4, 8)).astype(np.int32),
                                  "mask": np.ones((4, 8), bool)}, mesh)
    for _ in range(3):      # zero-initialised output layers keep the text encoder's gradient at 0 for 2
        before = state.params
        state, metrics = step(state, batch)
    end = parallel.to_host(state.params)

    # The logged gradient norm is the trained params' (the one clipping sees), not the frozen ones'.
    grads = jax.grad(lambda p: task.loss(p, batch, jax.random.fold_in(training._key(state.rng), 2), True, None)[0])(before)
    trained = {"text_encoder": {k: v for k, v in grads["text_encoder"].items() if k not in ("resblocks_0", "token_embedding")},
               "unet": grads["unet"]}
    assert float(optax.tree.norm(grads["text_encoder"]["resblocks_0"])) > 0
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(trained)), rel=1e-4)
    assert float(metrics["grad_norm"]) < float(optax.tree.norm(grads))
    for prefix in frozen:
        group, name = prefix.split("/")
        assert_trees_close(start[group][name], end[group][name], 0.0, prefix)
    for group, name in [("text_encoder", "positional_embedding"), ("text_encoder", "transformer_proj"),
                        ("unet", "out_conv")]:
        with pytest.raises(AssertionError):
            assert_trees_close(start[group][name], end[group][name], 1e-6, f"{group}/{name}")


def test_a_frozen_entry_that_names_no_parameter_is_a_config_error():
    import jax.numpy as jnp

    from glide_jax import training
    from glide_jax.config import ConfigError

    params = {"text_encoder": {"resblocks_0": {"w": jnp.ones(2)}}, "unet": {"w": jnp.ones(2)}}
    with pytest.raises(ConfigError, match=r"\['text_encoder/resblock_0'\] name no parameter .*'text_encoder', 'unet'"):
        training.make_optimizer(training.OptimizerConfig(frozen=["text_encoder/resblock_0"])).init(params)
    with pytest.raises(ConfigError, match="'/'-joined parameter paths"):
        training.OptimizerConfig(frozen=["text_encoder//x"])


def test_a_run_resumes_only_with_the_frozen_list_it_was_trained_with(env, spm_model, workdir):
    run_dir = workdir / "frozen_run"
    frozen = ["text_encoder/resblocks_0"]
    config = write_config(workdir / "frozen.json",
                          run_config(spm_model, run_dir, train_steps=5, optimizer__frozen=frozen))
    proc = subprocess.run(train_cmd(config), env=env, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The same list resumes; another one is a config error that names both, not orbax's tree mismatch.
    proc = subprocess.run(train_cmd(config, "train_steps=10"), env=env, capture_output=True, text=True,
                          timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "10").is_dir()
    proc = subprocess.run(train_cmd(config, "train_steps=15", "optimizer.frozen=[]"), env=env, capture_output=True,
                          text=True, timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert (f"optimizer.frozen is [], but the checkpoints in {run_dir} were trained with "
            "['text_encoder/resblocks_0']") in proc.stderr
    assert not (run_dir / "15").exists()


def test_a_clip_run_with_negative_weight_trains_on_the_negative_captions(workdir, golden):
    import jax

    vocab = workdir / "clip_vocab"
    vocab.mkdir(exist_ok=True)
    shutil.copy(golden / "vocab" / "bpe_simple_vocab_16e6.txt.gz", vocab)
    clip_model = {"image_size": 16, "patch_size": 4, "max_text_len": 16, "n_embd": 16, "n_head_state_text": 8,
                  "n_head_text": 2, "n_xf_blocks_text": 1, "n_head_state_image": 8, "n_head_image": 2,
                  "n_xf_blocks_image": 1, "n_timesteps": 100}
    config = run_config(None, workdir / "clip_negatives", model=clip_model, model_kind="clip", negative_weight=2.0,
                        tokenizer={"kind": "clip_bpe", "vocab_dir": str(vocab)}, diffusion={})
    trainer, loaded, batch = first_batch(write_config(workdir / "clip_negatives.json", config))
    assert batch["has_negative"].tolist() == [bool(c) for c in loaded["negative_captions"]]
    expected, expected_len = trainer.tokenizer.batch_padded_and_len(loaded["negative_captions"], 16)
    np.testing.assert_array_equal(batch["negative_clip_tokens"], expected)
    np.testing.assert_array_equal(batch["negative_clip_text_len"], expected_len)
    loss, metrics = trainer.task.loss(trainer.state.params, batch, jax.random.key(0))
    assert {"contrastive", "negative", "negative_won", "negative_compared"} <= set(metrics)
    np.testing.assert_allclose(loss, metrics["contrastive"] + 2.0 * metrics["negative"], rtol=1e-6)
