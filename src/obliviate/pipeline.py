"""Load and save diffusers pipelines (Stable Diffusion 1.x/2.x, SDXL), safetensors only,
offline by default. The pipeline class comes from the folder's `model_index.json`, or, for a
single checkpoint file, from its tensor names (SDXL's second text encoder).

A model is named by one of:
- `shapes`: the small model shipped inside the package (trained by `obliviate train-base`);
- a local diffusers folder (with `model_index.json`), e.g. one obliviate wrote;
- a single `.safetensors` checkpoint file (Stable Diffusion 1.x/2.x or SDXL layout);
- a hub id such as `runwayml/stable-diffusion-v1-5`, used only from the local cache unless
  `online=True` (or `OBLIVIATE_ONLINE=1`).
Pickle checkpoints (.ckpt, .bin, .pt, .pth) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
import diffusers
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import ObliviateError

# obliviate shows its own progress; the libraries' per-file loading bars are noise in logs.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

# Models inside the package: the shapes world on Stable Diffusion 1.x's layout and on SD3's.
SHIPPED = {"shapes": "assets/shapes", "shapes-sd3": "assets/shapes-sd3"}
SHIPPED_BUILD = {"shapes": "obliviate train-base",
                 "shapes-sd3": "obliviate train-base --family sd3 --init-from shapes"}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DELTA_FILE = "delta.safetensors"
DEFAULT_SAMPLER = {"num_inference_steps": 50, "guidance_scale": 7.5}


def save_pipeline(pipe, folder: Path) -> None:
    """`pipe.save_pretrained(folder)` in safetensors, without diffusers' warning for the
    components a model leaves out on purpose (SD3 trained without T5: `text_encoder_3=None`,
    which is how it is loaded back)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)


def shipped_model_path(name: str) -> Path:
    """Folder of a model shipped inside the package; clear error if it was never trained."""
    path = _package_folder(name)
    if not (path / "model_index.json").exists():
        raise ObliviateError(
            f"the shipped model {name!r} is missing at {path}; run `{SHIPPED_BUILD[name]}` to build it"
        )
    return path


def is_shipped(folder: str | os.PathLike) -> bool:
    """Whether `folder` is one of the models inside the package: those are read-only (their
    cards hold the figures of the documented protocol; an installed package is not ours to
    write into)."""
    here = Path(folder).resolve()
    return any(here == _package_folder(name).resolve() for name in SHIPPED)


def _package_folder(name: str) -> Path:
    """Where the shipped model `name` lives inside the installed package."""
    return Path(str(resources.files("obliviate") / SHIPPED[name]))


def resolve_model(model: str | os.PathLike) -> Path | str:
    """Turn a model name into a local folder/file path, or return a hub id unchanged.

    Raises ObliviateError for a missing folder, a folder that is not a diffusers pipeline,
    or a pickle checkpoint.
    """
    text = str(model)
    if text in SHIPPED:
        return shipped_model_path(text)
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ObliviateError(
            f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
            ".safetensors first"
        )
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ObliviateError(f"{path} is not a .safetensors checkpoint or a diffusers folder")
        return path
    if path.is_dir():
        if (path / DELTA_FILE).exists() and (path / "obliviate.json").exists():
            return path
        if not (path / "model_index.json").exists():
            raise ObliviateError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); "
                "point --model at the folder that holds model_index.json"
            )
        pickles = [p for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(path.rglob("*.safetensors")):
            raise ObliviateError(
                f"{path} holds only pickle weights ({pickles[0].name}); convert them to safetensors"
            )
        return path
    known = ", ".join(SHIPPED)
    first = Path(text.split("/", 1)[0]).expanduser()
    if could_be_hub_id(text) and not first.exists():
        return text
    if "/" in text or os.sep in text or first.exists():
        raise ObliviateError(
            f"model {text!r} not found: the folder {text} does not exist; check the path (give a diffusers folder, a .safetensors "
            f"file or a shipped model name: {known})")
    raise ObliviateError(
        f"model {text!r} not found: give a diffusers folder, a .safetensors file, a hub id, "
        f"or a shipped model name ({known})"
    )


def could_be_hub_id(text: str) -> bool:
    """Whether `text` has the form of a hub id (`owner/name`), not of a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w][\w.-]{0,95}", text) is not None and ".." not in text


def pipeline_class(source: Path | str):
    """The diffusers pipeline class to load `source` with: the `_class_name` of a folder's
    `model_index.json` (for a hub id, of the copy in the local hub cache, else SDXL when the
    id says "xl" and Stable Diffusion otherwise); for a single
    .safetensors file, from its tensor names (SDXL's second text encoder, SD3's joint blocks,
    Flux's double blocks), else Stable Diffusion. Refuses classes of families obliviate does
    not support."""
    from .families import FAMILIES, family_for_class

    name = "StableDiffusionPipeline"
    if isinstance(source, Path) and source.is_dir():
        try:
            name = json.loads((source / "model_index.json").read_text()).get("_class_name", name)
        except (OSError, ValueError, AttributeError) as exc:
            raise ObliviateError(f"{source}/model_index.json is not readable JSON ({exc}); restore the folder") from None
    elif isinstance(source, Path):
        try:
            with safe_open(str(source), framework="pt") as f:
                name = _single_file_class(list(f.keys()))
        except Exception:  # noqa: BLE001 - unreadable: the loader below reports it in one line
            pass
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "model_index.json")
        if isinstance(cached, str):
            name = json.loads(Path(cached).read_text()).get("_class_name", name)
        elif "xl" in str(source).lower():
            name = "StableDiffusionXLPipeline"
    if family_for_class(name) is None or not hasattr(diffusers, name):
        known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
        raise ObliviateError(f"{source} is a {name}, not a model family obliviate supports yet ({known})")
    return getattr(diffusers, name)


def absent_components(source: Path | str) -> dict[str, None]:
    """Components a folder's `model_index.json` records as absent ([null, null]), e.g. an SD3
    pipeline saved without its T5 encoder: they must be passed as None to load it."""
    if not (isinstance(source, Path) and source.is_dir()):
        return {}
    index = json.loads((source / "model_index.json").read_text())
    return {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}


# tensor-name prefixes that tell single-file checkpoints apart (original, non-diffusers layouts)
_SINGLE_FILE_MARKS = (("StableDiffusionXLPipeline", "conditioner.embedders.1."),
                      ("StableDiffusion3Pipeline", "model.diffusion_model.joint_blocks."),
                      ("FluxPipeline", "double_blocks."),
                      ("FluxPipeline", "model.diffusion_model.double_blocks."))


def _single_file_class(keys: list[str]) -> str:
    """The pipeline class a single checkpoint's tensor names point to."""
    for name, prefix in _SINGLE_FILE_MARKS:
        if any(k.startswith(prefix) for k in keys):
            return name
    return "StableDiffusionPipeline"


@contextmanager
def hub_offline(offline: bool = True):
    """While loading: the hub libraries' offline switches on (HF_HUB_OFFLINE,
    TRANSFORMERS_OFFLINE, and the copies of the flag diffusers/transformers imported), so
    that nothing opens a socket; restored afterwards."""
    if not offline:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")}
    saved_flags = []
    os.environ.update({k: "1" for k in saved_env})
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("huggingface_hub", "diffusers", "transformers") and \
                isinstance(getattr(module, "HF_HUB_OFFLINE", None), bool):
            saved_flags.append((module, module.HF_HUB_OFFLINE))
            module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in saved_flags:
            module.HF_HUB_OFFLINE = value
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_pipeline(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    online: bool | None = None,
    delta_base: str | os.PathLike | None = None,
) -> StableDiffusionPipeline:
    """Load a pipeline (Stable Diffusion 1.x/2.x or SDXL) from any name `resolve_model` accepts.

    The safety checker is not loaded (erasure research needs the raw output); the progress
    bar of the sampler is off (obliviate shows its own). Unless `online` (or
    `OBLIVIATE_ONLINE=1`), no socket is opened: only local files and the hub cache are read.
    `delta_base` loads a delta folder onto a base that has moved (its hash is still checked).
    """
    source = resolve_model(model)
    if isinstance(source, Path) and (source / DELTA_FILE).exists():
        return _load_delta(source, device, dtype, online, delta_base)
    online = online if online is not None else os.environ.get("OBLIVIATE_ONLINE") == "1"
    cls = pipeline_class(source)
    kwargs = dict(dtype=dtype, **absent_components(source))
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with hub_offline(not online):
            if isinstance(source, Path) and source.is_file():
                pipe = cls.from_single_file(str(source), local_files_only=not online, **kwargs)
            else:
                pipe = cls.from_pretrained(
                    str(source), use_safetensors=True, local_files_only=not online, **kwargs
                )
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if online:
            hint = ""
        elif isinstance(source, Path) and source.is_file():
            hint = (" (offline: a single .safetensors file needs its model family's configs in the hub "
                    "cache; set OBLIVIATE_ONLINE=1 once to fetch them, or give a diffusers folder)")
        elif isinstance(source, Path):
            hint = ""
        else:
            hint = (f" (no folder {source} exists here, and the hub id {source} is not in the local cache; "
                    "set OBLIVIATE_ONLINE=1 to download it)")
        raise ObliviateError(f"cannot load model {model}: {first}{hint}") from exc
    pipe.set_progress_bar_config(disable=True)
    pipe.obliviate_source = str(source)
    pipe.obliviate_model = str(model) if str(model) in SHIPPED or not isinstance(source, Path) \
        else str(source.resolve())
    pipe.obliviate_info = read_model_info(source)
    return pipe.to(device)


def _load_delta(folder: Path, device, dtype, online, delta_base=None) -> StableDiffusionPipeline:
    """A delta folder: load its base, check the base's hash, apply the changed tensors."""
    from .ledger import weights_sha256

    info = read_model_info(folder)
    base = info.get("delta_of")
    if not isinstance(base, str) or not isinstance(info.get("base_sha256"), str):
        raise ObliviateError(f"{folder}/obliviate.json does not name the delta's base (delta_of, base_sha256); "
                             "restore the folder obliviate wrote")
    fix = (f"put the base back there, or point the delta at the base's new place with `obliviate export "
           f"{folder} --base NEW_PLACE --out FULL_FOLDER` (a full copy that needs no base)")
    where = str(delta_base) if delta_base else base
    try:
        pipe = load_pipeline(where, device="cpu", dtype=dtype, online=online)
    except ObliviateError as exc:
        raise ObliviateError(f"{folder} is a delta: it stores only the changes to its base {where}, which "
                             f"cannot be loaded ({exc}); {fix}") from None
    if weights_sha256(pipe) != info["base_sha256"]:
        raise ObliviateError(
            f"{folder} is a delta of the base {where}, whose weights are not the ones the delta was made "
            f"from (sha256 {info['base_sha256'][:12]}); {fix}")
    apply_delta(pipe, folder)
    pipe.obliviate_source = str(folder)
    pipe.obliviate_model = str(folder.resolve())
    pipe.obliviate_info = info
    return pipe.to(device)


def apply_delta(pipe, folder: Path) -> None:
    """Load the changed tensors of a delta folder (`component.name` keys) into `pipe`."""
    tensors = load_file(Path(folder) / DELTA_FILE)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, name = key.split(".", 1)
        grouped.setdefault(component, {})[name] = value
    for component, state in grouped.items():
        module = getattr(pipe, component)
        missing = set(state) - set(module.state_dict())
        if missing:
            raise ObliviateError(f"{folder}: the delta names tensors its base lacks ({sorted(missing)[0]})")
        module.load_state_dict(state, strict=False)


def read_model_info(source: Path | str) -> dict:
    """obliviate's metadata beside a model (`obliviate.json`): world, sampler defaults."""
    if isinstance(source, Path) and (source / "obliviate.json").exists():
        try:
            info = json.loads((source / "obliviate.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ObliviateError(f"{source}/obliviate.json is not readable JSON ({str(exc).splitlines()[0]}); "
                                 "restore the folder obliviate wrote") from None
        if not isinstance(info, dict):
            raise ObliviateError(f"{source}/obliviate.json is not a JSON object; restore the folder obliviate wrote")
        return info
    return {}


def sampler_settings(pipe: StableDiffusionPipeline) -> dict:
    """Default sampler settings for a pipeline: the model's own, else Stable Diffusion's."""
    return {**DEFAULT_SAMPLER, **getattr(pipe, "obliviate_info", {}).get("sampler", {})}


def model_world(pipe: StableDiffusionPipeline) -> str | None:
    """Name of the built-in world a model belongs to (`"shapes"`), or None for real models."""
    return getattr(pipe, "obliviate_info", {}).get("world")
