"""Training metrics: the JSON lines as before, TensorBoard event files with the same numbers and
the sample grids, W&B (a fake `wandb` module) when a project is set, and clear refusals."""

import io
import itertools
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from test_remote_paths import read_events, scalars
from test_training import run_config

from glide_jax.config import ConfigError
from train import metrics
from train.run_config import LogSection, load_run_config


class FakeWandb(types.ModuleType):
    """What train.metrics uses of wandb: init, Run.log, Run.finish, Image."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    class Image:
        def __init__(self, data, caption=None):
            self.data, self.caption = np.asarray(data), caption


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from demo import shapes
    from glide_jax import tokenizers

    captions = [c for scene in itertools.islice(shapes.iter_scenes(0), 300) for c in scene.captions()]
    path = tmp_path_factory.mktemp("tokenizer") / "shapes.model"
    tokenizers.SentencePieceTokenizer.train(captions, path, 40)
    return path


def test_a_run_writes_tensorboard_and_wandb_with_the_json_lines_numbers(spm_model, tmp_path, fake_wandb):
    from train.train import Trainer

    run_dir = tmp_path / "run"
    config = run_config(spm_model, run_dir, train_steps=4, checkpoint__every=4, log__every=2,
                        log__wandb_project="glide-tests", sample={"every": 2, "count": 2, "respacing": "4"})
    (tmp_path / "run.json").write_text(json.dumps(config))
    trainer = Trainer(*load_run_config(tmp_path / "run.json", []))
    try:
        trainer.run()
    finally:
        trainer.close()

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "event" not in r]
    assert [r["step"] for r in records] == [2, 4] and lines[-1]["event"] == "done"
    assert {"loss", "grad_norm", "learning_rate", "images_per_sec", "eta_s", "time"} <= set(records[0])
    events = read_events(run_dir / "tensorboard")
    logged = scalars(events)
    expected = {(key, r["step"]): value for r in records for key, value in r.items()
                if key not in ("step", "time", "eta_s") and value is not None}
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key
    assert ("images_per_sec", 4) in logged and ("learning_rate", 2) in logged
    walltimes = {e.step: e.wall_time for e in events if any(v.tag == "loss" for v in e.summary.value)}
    assert walltimes == {r["step"]: pytest.approx(r["time"]) for r in records}

    grids = {e.step: v.image for e in events for v in e.summary.value if v.tag == "samples"}
    assert sorted(grids) == [2, 4]
    for step, image in grids.items():
        on_disk = np.asarray(Image.open(run_dir / "samples" / f"step_{step:08d}.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), on_disk)

    (run,) = fake_wandb.runs
    assert run.kwargs["project"] == "glide-tests" and run.kwargs["config"] == config and run.finished
    assert run.kwargs["id"] == (run_dir / metrics.WANDB_ID_FILE).read_text().strip()
    wandb_scalars = {(key, step): value for step, data in run.logged for key, value in data.items()
                     if not isinstance(value, FakeWandb.Image)}
    assert wandb_scalars == pytest.approx(expected)
    images = [(step, value) for step, data in run.logged for value in data.values() if isinstance(value, FakeWandb.Image)]
    assert [step for step, _ in images] == [2, 4]
    np.testing.assert_array_equal(images[0][1].data, np.asarray(Image.open(run_dir / "samples" / "step_00000002.png")))


def test_a_resumed_run_goes_on_in_the_same_wandb_run(tmp_path, fake_wandb):
    for _ in range(2):
        metrics.MetricsWriter(LogSection(wandb_project="p"), tmp_path, tmp_path / "m.jsonl", {}).close()
    first, second = fake_wandb.runs
    assert first.kwargs["id"] == second.kwargs["id"] and second.kwargs["resume"] == "allow"


def test_tensorboard_off_writes_only_the_json_lines(tmp_path):
    writer = metrics.MetricsWriter(LogSection(tensorboard=False), tmp_path, tmp_path / "m.jsonl", {})
    record = {"step": 5, "loss": 0.5, "images_per_sec": None, "eta_s": None, "time": 1.0}
    writer.log(record)
    writer.image("samples", 5, np.zeros((4, 4, 3), np.uint8))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]
    assert (tmp_path / "m.jsonl").read_text() == json.dumps(record) + "\n"


def test_a_wandb_project_without_wandb_is_refused_before_anything_is_made(spm_model, tmp_path, monkeypatch):
    from train.train import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)     # what an uninstalled module looks like to import
    config = run_config(spm_model, tmp_path / "run", log__wandb_project="glide-tests")
    (tmp_path / "run.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"log\.wandb_project is set but wandb is not installed; `pip install wandb`"):
        Trainer(*load_run_config(tmp_path / "run.json", []))
    assert not (tmp_path / "run").exists()


def test_a_path_epath_cannot_open_is_a_config_error_naming_the_key(spm_model, tmp_path):
    config = run_config(spm_model, "ftp://host/run")
    (tmp_path / "run.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"checkpoint\.dir: ftp://host/run: etils\.epath cannot open ftp:// paths"):
        load_run_config(tmp_path / "run.json", [])
