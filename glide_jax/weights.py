"""The released GLIDE (filtered) weights: downloaded once, converted once, then loaded from orbax.

    >>> config, params = load_released("base")          # ModelConfig, params tree (numpy)
    >>> clip_config, clip_params = load_released("clip")  # ClipConfig, {image_encoder, text_encoder}

Names: `base`, `upsample`, `base-inpaint`, `upsample-inpaint` (the U-Nets) and `clip` (the noised
CLIP: `clip_image_enc.pt` and `clip_text_enc.pt` together, one params tree).

Cache layout, under `<cache>/weights` (`<cache>` is `download.cache_dir()`: `$GLIDE_JAX_CACHE`
or the platform's user cache):

    base.pt         the reference's file while it is being downloaded or converted
    base/           the converted copy: config.json + params/ (orbax), what later calls load

The download goes through `download.fetch` (a `.partial` file, renamed only when complete;
resumed by a later call after an interruption). The released files' sizes and hashes are not
pinned here (they could not be looked up when this was written), so a download is verified by
the server's Content-Length (a short transfer is resumed, never accepted) and then by the
converter, which checks every key and shape of the state dict against the config before writing
anything. A file that fails that check is kept and named in the error (a format problem is not
fixed by downloading gigabytes again).

Once the converted copy is complete the `.pt` is deleted (`keep_checkpoint=False`, the default):
the converted copy is the cache, and keeping both would double the disk used (about 1.5 GB per
U-Net). The converted copy is written atomically (`checkpoint.save_model`), so an interrupted or
failed conversion never leaves a half-written directory under the final name.

`GLIDE_JAX_WEIGHTS_URL` replaces the base URL (a mirror, or a local server in tests): a file is
fetched from `<base URL>/<file name>`. Concurrent calls from several processes on one machine are
serialised per model with a file lock (POSIX only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

from . import download
from .clip import ClipConfig, ClipConversionError, load_clip_checkpoints
from .config import NON_ARCHITECTURE_KEYS, ConfigError, ModelConfig
from .convert import ConversionError, convert_state_dict
from .pt_reader import PtFormatError, load_state_dict

__all__ = ["DEFAULT_BASE_URL", "DEMO_DIR", "WEIGHTS_URL_ENV", "RELEASED", "ReleasedModel", "WeightsError",
           "find_converted", "hub_snapshot", "is_hub_id", "load", "load_local", "load_released", "released_config", "weights_dir",
           "weights_url"]

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/dec-2021"
WEIGHTS_URL_ENV = "GLIDE_JAX_WEIGHTS_URL"

AnyConfig = Union[ModelConfig, ClipConfig]

# The configs ship in the repository's configs/ folder, beside the package, and the bundled demo
# models (the offline default) in its demo/ folder.
_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"


class WeightsError(RuntimeError):
    """Released weights could not be found, downloaded, converted or loaded; the message says which
    file, where it was looked for, and how to provide it."""


@dataclasses.dataclass(frozen=True)
class ReleasedModel:
    name: str                       # as `load_released` takes it, e.g. "base-inpaint"
    files: tuple[str, ...]          # the reference's file names, fetched from <base URL>/<file>
    config_file: str                # in configs/
    converted: str                  # directory name of the converted copy
    # Byte sizes of `files` where known (None: verified by Content-Length and conversion only).
    sizes: tuple[int | None, ...]

    @property
    def is_clip(self) -> bool:
        return self.config_file == "clip.json"


RELEASED: dict[str, ReleasedModel] = {m.name: m for m in (
    ReleasedModel("base", ("base.pt",), "base.json", "base", (None,)),
    ReleasedModel("upsample", ("upsample.pt",), "upsample.json", "upsample", (None,)),
    ReleasedModel("base-inpaint", ("base_inpaint.pt",), "base_inpaint.json", "base_inpaint", (None,)),
    ReleasedModel("upsample-inpaint", ("upsample_inpaint.pt",), "upsample_inpaint.json",
                  "upsample_inpaint", (None,)),
    ReleasedModel("clip", ("clip_image_enc.pt", "clip_text_enc.pt"), "clip.json", "clip", (None, None)),
)}


def _released(name: str) -> ReleasedModel:
    try:
        return RELEASED[name]
    except KeyError:
        raise WeightsError(f"unknown released model {name!r}; the released models are "
                           f"{', '.join(RELEASED)}") from None


def released_config(name: str) -> AnyConfig:
    """The config of a released model, from `configs/`: a `ModelConfig`, or a `ClipConfig` for clip."""
    model = _released(name)
    path = _CONFIGS_DIR / model.config_file
    if not path.is_file():
        raise WeightsError(f"the config of {name!r} should be at {path} but is missing; glide_jax "
                           f"expects its configs/ folder beside the package (an editable install)")
    return ClipConfig.from_json(path) if model.is_clip else ModelConfig.from_json(path)


def weights_url(file: str, base_url: str | None = None) -> str:
    """`<base URL>/<file>`; the base is `base_url`, else `$GLIDE_JAX_WEIGHTS_URL`, else the official one."""
    base = base_url or os.environ.get(WEIGHTS_URL_ENV) or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + file


def weights_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where released weights are cached: `<cache>/weights`, `cache` defaulting to `download.cache_dir()`."""
    return Path(cache if cache is not None else download.cache_dir()) / "weights"


# -- converted copies ------------------------------------------------------------------------------


def _is_converted(directory: Path) -> bool:
    from .checkpoint import is_saved_model

    return is_saved_model(directory)


def _same_network(a: AnyConfig, b: AnyConfig) -> bool:
    """Whether params made for `a` fit `b`; keys that do not shape the network are ignored, so
    editing one of them in configs/ does not throw away (and re-download) a converted copy."""
    if type(a) is not type(b):
        return False
    ignored = NON_ARCHITECTURE_KEYS if isinstance(a, ModelConfig) else ()
    drop = lambda c: {k: v for k, v in c.to_dict().items() if k not in ignored}  # noqa: E731
    return drop(a) == drop(b)


def _config_of(directory: Path, model: ReleasedModel) -> AnyConfig:
    """The config stored beside a converted copy; a copy of another variant in this slot (a base
    model as the upsampler) is refused. Raises WeightsError naming the file."""
    path = directory / "config.json"
    try:
        values = json.loads(path.read_text())
        found = (ClipConfig if model.is_clip else ModelConfig).from_dict(values, source=str(path))
    except (OSError, ValueError, TypeError) as err:  # ConfigError and JSONDecodeError are ValueErrors
        raise WeightsError(f"{path}: not a usable {model.name} config ({err})") from None
    if not model.is_clip:
        released = released_config(model.name)
        for flag in ("inpaint", "super_res"):
            if getattr(found, flag) != getattr(released, flag):
                raise WeightsError(f"{directory} holds a model with {flag}={getattr(found, flag)}, but "
                                   f"{model.name!r} has {flag}={getattr(released, flag)}")
    return found


def _load_params(directory: Path, dtype) -> Any:
    from .checkpoint import CheckpointError, load_model

    try:
        return load_model(directory, dtype=dtype)[1]
    except (CheckpointError, FileNotFoundError) as err:
        raise WeightsError(f"cannot load the converted weights in {directory}: {err}. Delete that "
                           f"directory to convert (or download) them again") from None


def _cast(params: Any, dtype) -> Any:
    if dtype is None:
        return params
    import jax

    return jax.tree.map(
        lambda a: a.astype(dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else a, params)


def _convert_files(model: ReleasedModel, paths: list[Path], config: AnyConfig) -> Any:
    """The reference files -> float32 params (nothing written); raises WeightsError naming the file."""
    try:
        for path, size in zip(paths, model.sizes):
            # A cut or foreign file is reported as that, before the reader calls it corrupt.
            download.check_file(path, size)
        if model.is_clip:
            return load_clip_checkpoints(paths[0], paths[1], config)
        return convert_state_dict(load_state_dict(paths[0]), config, source=str(paths[0]))
    except (PtFormatError, ConversionError, ClipConversionError, ConfigError, download.DownloadError) as err:
        raise WeightsError(f"{' and '.join(map(str, paths))} cannot be converted to the {model.name} "
                           f"model: {err}") from None


def _wanted_config(model: ReleasedModel, config: AnyConfig | None) -> AnyConfig:
    if config is None:
        return released_config(model.name)
    wanted = ClipConfig if model.is_clip else ModelConfig
    if not isinstance(config, wanted):
        raise WeightsError(f"{model.name!r} needs a {wanted.__name__}, got a {type(config).__name__}")
    return config


# -- the cache ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` so two processes never append to one `.partial` file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _missing_offline_message(model: ReleasedModel, root: Path, missing: list[Path], base_url) -> str:
    lines = [f"the released {model.name!r} weights are not in the cache and offline mode is on "
             f"(GLIDE_JAX_OFFLINE or offline=True), so nothing was downloaded."]
    for path in missing:
        lines.append(f"  missing file: {path.name}, expected at {path} "
                     f"(download it from {weights_url(path.name, base_url)})")
    lines.append(f"  no converted copy either: expected at {root / model.converted}/")
    files = " and ".join(model.files)
    lines.append(f"To provide it: put {files} at the path(s) above, or pass --checkpoint-dir DIR "
                 f"(load_local) with DIR holding {files} or a converted {model.converted}/ "
                 f"(python -m glide_jax.convert), or turn offline mode off to download it.")
    return "\n".join(lines)


def load_released(name: str, *, cache: str | os.PathLike | None = None, offline: bool | None = None,
                  progress: bool = True, config: AnyConfig | None = None, dtype=None,
                  keep_checkpoint: bool = False, base_url: str | None = None, retries: int = 3,
                  retry_wait: float = 1.0) -> tuple[AnyConfig, Any]:
    """`(config, params)` of a released model, downloading and converting it on first use.

    `name` is one of `RELEASED`. `cache` replaces `download.cache_dir()`; `offline` (default
    `$GLIDE_JAX_OFFLINE`) forbids the network, so only a cached copy can be used; `progress` shows
    a progress bar on stderr while downloading. `config` replaces the released config (for mirrors
    of other models and tests); a converted copy made with a different config is replaced.
    `dtype` casts floating-point params (e.g. `jnp.bfloat16`); params come back as numpy arrays.
    `keep_checkpoint` keeps the `.pt` after conversion. `base_url` overrides
    `$GLIDE_JAX_WEIGHTS_URL`; `retries`/`retry_wait` are `download.fetch`'s.
    Raises `WeightsError` saying which file is missing or wrong, where, and how to provide it.
    """
    model = _released(name)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise WeightsError(f"retries must be a non-negative integer, got {retries!r}")
    config = _wanted_config(model, config)
    root = weights_dir(cache)
    converted = root / model.converted

    def cached() -> bool:
        if not _is_converted(converted):
            return False
        try:
            return _same_network(_config_of(converted, model), config)
        except WeightsError:  # an unreadable config.json: convert again over it
            return False

    if cached():
        return config, _load_params(converted, dtype)

    paths = [root / file for file in model.files]
    missing = [p for p in paths if not p.is_file()]
    if missing and download.is_offline(offline):
        raise WeightsError(_missing_offline_message(model, root, missing, base_url))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(f"cannot create the weights cache {root}: {err} (set GLIDE_JAX_CACHE to a "
                           f"writable directory)") from None

    with _locked(root / f".{model.converted}.lock"):
        if cached():  # another process finished while we waited for the lock
            return config, _load_params(converted, dtype)
        for path, size in zip(paths, model.sizes):
            url = weights_url(path.name, base_url)
            try:
                download.fetch(url, path, expected_size=size, progress=progress, offline=offline,
                               retries=retries, retry_wait=retry_wait)
            except download.DownloadError as err:
                raise WeightsError(f"cannot get the {name!r} weights: {err} Or pass --checkpoint-dir "
                                   f"DIR with DIR holding {path.name}.") from err
        try:
            params = _convert_files(model, paths, config)
        except WeightsError as err:
            # Kept: the download was complete (its size checked), so a format problem or a config
            # mismatch is fixed by the user or a newer glide-jax, never by fetching gigabytes again.
            kept = " and ".join(str(p) for p in paths)
            raise WeightsError(f"{err}\nThe downloaded file(s) are kept at {kept} (complete: their size "
                               f"checked out, so the content or its format is the problem); delete them to "
                               f"download again from {weights_url(model.files[0], base_url)}.") from None
        _save_converted(converted, params, config)
        if not keep_checkpoint:
            for path in paths:
                path.unlink(missing_ok=True)
    return config, _cast(params, dtype)


def _save_converted(directory: Path, params: Any, config: AnyConfig) -> None:
    from .checkpoint import save_model

    if directory.exists() and not _is_converted(directory):
        raise WeightsError(f"{directory} exists but is not a converted model; move it away so the "
                           f"converted weights can be written there")
    try:
        save_model(directory, params, config.to_dict(), overwrite=True)
    except OSError as err:
        raise WeightsError(f"cannot write the converted weights to {directory}: {err}") from None
    print(f"converted weights saved to {directory}", file=sys.stderr)


# -- a directory given by the user -------------------------------------------------------------------


def find_converted(path: str | os.PathLike, name: str) -> Path | None:
    """The converted copy of model `name` in a user's directory: `path` itself when it is one of
    that variant, else `path/<name>/` (`base_inpaint/` and `base-inpaint/` both work); None when
    there is none (the reference's `.pt` files may still be there)."""
    model = _released(name)
    directory = Path(path).expanduser()
    for candidate in dict.fromkeys((directory, directory / model.converted, directory / model.name)):
        if not _is_converted(candidate):
            continue
        if candidate == directory:
            try:
                _config_of(candidate, model)
            except WeightsError:
                continue  # `path` is some other converted model; look inside it
        return candidate
    return None


def load_local(path: str | os.PathLike, name: str, *, config: AnyConfig | None = None,
               dtype=None) -> tuple[AnyConfig, Any]:
    """`(config, params)` of model `name` from a directory the user provides (`--checkpoint-dir`).

    A converted copy (`find_converted`) brings its own config (it may be a fine-tuned or smaller
    model), which must be of the same variant; with `config` given it must equal it. Otherwise the
    reference's file(s) `path/<file>.pt` are converted in memory (nothing is written to `path`).
    Never touches the network.
    """
    model = _released(name)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise WeightsError(f"checkpoint directory {directory} does not exist or is not a directory")
    converted = find_converted(directory, name)
    if converted is not None:
        found = _config_of(converted, model)
        if config is not None and not _same_network(found, _wanted_config(model, config)):
            raise WeightsError(f"{converted} holds a model whose config differs from the one asked for")
        return found, _load_params(converted, dtype)

    config = _wanted_config(model, config)
    paths = [directory / file for file in model.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        wanted = ", ".join(f"{p} (from {weights_url(p.name)})" for p in missing)
        raise WeightsError(
            f"no {name!r} weights in {directory}: expected a converted copy {directory / model.converted}/ "
            f"or the reference's file(s); missing {wanted}")
    return config, _cast(_convert_files(model, paths, config), dtype)


# -- the one resolver ----------------------------------------------------------------------------------


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` names a Hugging Face Hub repository ("owner/name") rather than a local path."""
    text = str(source)
    return (not Path(text).expanduser().exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))
            and all(part and all(c.isalnum() or c in "-_." for c in part) for part in text.split("/")))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """A local copy of Hub repository `repo_id` (a directory of converted models), through
    huggingface_hub's cache: downloaded once, and with `HF_HUB_OFFLINE=1` only read from the cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise WeightsError(f"{repo_id!r} looks like a Hugging Face Hub repository, but huggingface_hub is not "
                           f"installed (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as err:
        raise WeightsError(f"the Hub repository {repo_id!r} is not in the local Hugging Face cache and it cannot "
                           f"be downloaded (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}, or no "
                           f"network): {' '.join(str(err).split())[:300]}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise WeightsError(f"cannot get the Hub repository {repo_id!r}: {' '.join(str(err).split())[:300]}") from None


def load(source: str | os.PathLike, name: str, *, dtype=None, **released_options) -> tuple[AnyConfig, Any]:
    """`(config, params)` of model `name` from `source`: "glide" (the released weights, downloaded
    and converted once; `released_options` go to `load_released`), "demo" (the bundled demo
    models), a directory of converted models (orbax or safetensors) or of the reference's `.pt`
    files, or a Hugging Face Hub repository id ("owner/name") holding such a directory."""
    if str(source) == "glide":
        return load_released(name, dtype=dtype, **released_options)
    if released_options:
        raise WeightsError(f"{sorted(released_options)} apply to the released weights only")
    directory = DEMO_DIR if str(source) == "demo" else (
        hub_snapshot(str(source)) if is_hub_id(source) else Path(source))
    if str(source) == "demo" and find_converted(directory, name) is None:
        raise WeightsError(
            f"the bundled demo model {name!r} is missing: expected {directory / _released(name).converted}/ "
            f"with config.json and params/ (see demo/REPRODUCE.md to rebuild it); 'glide' uses the "
            f"released GLIDE weights")
    return load_local(directory, name, dtype=dtype)
