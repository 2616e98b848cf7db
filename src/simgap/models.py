"""open_clip model loading: one name grammar, weights always required, identity is a checksum.

Grammar of a :class:`ModelSpec`:

- ``arch``: an open_clip architecture name (``ViT-B-32``), a config shipped in
  ``simgap/model_configs/`` (``simgap-tiny``), or ``local-dir:/path`` (open_clip reads
  ``open_clip_config.json`` and the weights file in that folder) or ``hf-hub:org/repo``.
- ``checkpoint``: a local weights file: an open_clip_train checkpoint (a dict with
  ``state_dict``, keys maybe prefixed ``module.``) or a raw state dict; read with
  ``torch.load(weights_only=True)`` by open_clip.
- ``pretrained``: an open_clip pretrained tag (``laion400m_e32``); fetched by open_clip's own
  download code. Given together with ``checkpoint``, the file is taken as that tag's weights
  (the offline route): preprocessing follows the tag and the file's SHA-256 must match the one
  the tag's URL names, when it names one.

The weights that are loaded are always a local file that simgap hashed first, so the identity
recorded in a store manifest is the SHA-256 of exactly the bytes in the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simgap.io import sha256_file

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# Seed of the random init used only with allow_random=True, so that two random models of the
# same arch are the same model (tests compare embeddings across processes).
RANDOM_INIT_SEED = 0


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved to weights, or weights that cannot be loaded."""


class DeviceError(RuntimeError):
    """A device this process cannot use: ``--device cuda`` without a usable GPU, or a GPU whose
    context a CUDA error has made unusable."""


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    checkpoint: str | None = None
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            # Accept a Path but keep the spec hashable and JSON-friendly.
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))
        if _schema(self.arch) and (self.checkpoint or self.pretrained):
            raise ModelLoadError(
                f"{self.arch!r} carries its own weights; do not also pass "
                "checkpoint= or pretrained= (open_clip would ignore them)"
            )


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode
    preprocess: Callable[[Any], torch.Tensor]  # eval transform: PIL image -> (3, H, W) tensor
    tokenizer: Callable[..., torch.Tensor]
    identity: dict  # {"arch", "pretrained", "checkpoint_sha256"}
    device: str = "cpu"


def shipped_configs_dir() -> Path:
    return Path(__file__).parent / "model_configs"


def register_shipped_configs() -> None:
    """Make simgap's model configs known to open_clip by name (idempotent)."""
    import open_clip

    names = {p.stem for p in shipped_configs_dir().glob("*.json")}
    # add_model_config appends to a list and rescans each time: only call it when needed.
    if not names <= set(open_clip.list_models()):
        open_clip.add_model_config(shipped_configs_dir())


def model_identity(spec: ModelSpec, cache_dir: str | None = None) -> dict:
    """What a store manifest records: arch, tag and the SHA-256 of the weights file.

    ``checkpoint_sha256`` is None only for a spec without weights (random init).
    """
    return _identity(spec, _weights_file(spec, cache_dir))


def load_model(
    spec: ModelSpec,
    device: str = "cpu",
    *,
    allow_random: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Build the model, its eval transform and tokenizer; refuse to run without weights.

    ``allow_random=True`` permits a spec with neither checkpoint nor pretrained (tests only);
    the init is seeded so that it is the same model every time.
    """
    import open_clip

    check_device(device)
    register_shipped_configs()
    weights = _weights_file(spec, cache_dir)
    identity = _identity(spec, weights)
    if identity["checkpoint_sha256"] is None and not allow_random:
        raise ModelLoadError(
            f"model {spec.arch!r} has no weights: pass checkpoint='/path/to/weights.pt' or a "
            "pretrained tag (allow_random=True is for tests only)"
        )
    kwargs = _create_kwargs(spec, weights)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch,
                device=device,
                precision="fp32",
                require_pretrained=identity["checkpoint_sha256"] is not None,
                weights_only=True,
                cache_dir=cache_dir,
                **kwargs,
            )
        tokenizer = open_clip.get_tokenizer(spec.arch, cache_dir=cache_dir)
    except ModelLoadError:
        raise
    except Exception as e:  # re-raised with the spec named: open_clip's messages omit it
        raise ModelLoadError(f"cannot load model {spec}: {type(e).__name__}: {e}") from e
    model.eval()
    return LoadedModel(model, preprocess, tokenizer, identity, str(device))


def _identity(spec: ModelSpec, weights: str | None) -> dict:
    return {
        "arch": spec.arch,
        "pretrained": spec.pretrained,
        "checkpoint_sha256": sha256_file(weights) if weights else None,
    }


def _schema(arch: str) -> str | None:
    for prefix in (LOCAL_DIR_PREFIX, HF_HUB_PREFIX):
        if arch.startswith(prefix):
            return prefix
    return None


def _weights_file(spec: ModelSpec, cache_dir: str | None) -> str | None:
    """The local file whose bytes become the model's weights, fetching a tag if needed."""
    schema = _schema(spec.arch)
    if schema == LOCAL_DIR_PREFIX:
        return _local_dir_weights(spec.arch[len(LOCAL_DIR_PREFIX) :])
    if schema == HF_HUB_PREFIX:
        return _hf_hub_weights(spec.arch[len(HF_HUB_PREFIX) :], cache_dir)
    _check_arch(spec.arch)
    tag_cfg = _tag_cfg(spec) if spec.pretrained else None
    if spec.checkpoint:
        if not os.path.isfile(spec.checkpoint):
            raise ModelLoadError(f"checkpoint file not found: {spec.checkpoint}")
        if tag_cfg:
            _check_tag_hash(spec, tag_cfg)
        return spec.checkpoint
    if tag_cfg:
        return _download_tag(spec, tag_cfg, cache_dir)
    return None


def _check_arch(arch: str) -> None:
    import difflib

    import open_clip

    register_shipped_configs()
    known = open_clip.list_models()
    if arch.replace("/", "-") not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        raise ModelLoadError(
            f"unknown model architecture {arch!r}; close names: {close} "
            "(open_clip.list_models() lists all)"
        )


def _local_dir_weights(folder: str) -> str:
    # open_clip's own choice of file in the folder, so the hash is of the file it loads.
    from open_clip.factory import _find_checkpoint_in_dir

    if not os.path.isdir(folder):
        raise ModelLoadError(f"local-dir: folder not found: {folder}")
    found = _find_checkpoint_in_dir(Path(folder))
    if found is None:
        raise ModelLoadError(f"local-dir:{folder} holds no weights (*.safetensors, *.bin, *.pth)")
    return found


def _hf_hub_weights(model_id: str, cache_dir: str | None) -> str:
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(model_id, cache_dir=cache_dir)
    except Exception as e:
        raise ModelLoadError(
            f"could not fetch hf-hub:{model_id} ({type(e).__name__}: {e}). Offline, copy the "
            "repository to a folder and use arch='local-dir:/path/to/folder'"
        ) from e


def _tag_cfg(spec: ModelSpec) -> dict:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        known = list_pretrained_tags_by_model(spec.arch)
        raise ModelLoadError(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.arch!r}; known tags: {known}"
        )
    return cfg


def _download_tag(spec: ModelSpec, cfg: dict, cache_dir: str | None) -> str:
    from open_clip.pretrained import download_pretrained

    url = cfg.get("url", "")
    try:
        # Prefer the URL when the tag has one: open_clip checks its SHA-256 there, while the hub
        # copy is unchecked (and for ViT-B-16-plus-240/laion400m_e32 names the e31 repo).
        path = download_pretrained(cfg, prefer_hf_hub=not url, cache_dir=cache_dir)
    except Exception as e:
        source = url or f"hf-hub:{cfg.get('hf_hub', '')}"
        raise ModelLoadError(
            f"could not fetch pretrained weights {spec.arch}/{spec.pretrained} from {source} "
            f"({type(e).__name__}: {e}). Without network access, download that file on another "
            f"machine and pass it as a local checkpoint: ModelSpec(arch={spec.arch!r}, "
            f"pretrained={spec.pretrained!r}, checkpoint='/path/to/file') (the tag then only "
            "sets preprocessing and the expected hash), or checkpoint= alone"
        ) from e
    if not path:
        raise ModelLoadError(f"open_clip has no source for {spec.arch}/{spec.pretrained}")
    return path


def _expected_sha256_prefix(url: str) -> str:
    # The rule of open_clip.pretrained.download_pretrained_from_url: OpenAI URLs carry the full
    # hash as a folder, open_clip release files end in "-<sha256 prefix>.pt".
    if "openaipublic" in url:
        return url.split("/")[-2]
    if "mlfoundations" in url:
        return os.path.splitext(os.path.basename(url))[0].split("-")[-1]
    return ""


def _check_tag_hash(spec: ModelSpec, cfg: dict) -> None:
    expected = _expected_sha256_prefix(cfg.get("url", ""))
    if expected and not sha256_file(spec.checkpoint).startswith(expected):
        raise ModelLoadError(
            f"{spec.checkpoint} is not the weights of {spec.arch}/{spec.pretrained}: its SHA-256 "
            f"does not start with {expected} (from {cfg['url']})"
        )


def _create_kwargs(spec: ModelSpec, weights: str | None) -> dict:
    """open_clip.create_model_and_transforms arguments that select weights and preprocessing."""
    if _schema(spec.arch):
        return {}  # open_clip reads weights and preprocessing from the folder / hub repo
    if not spec.pretrained:
        return {"pretrained": weights}
    cfg = _tag_cfg(spec)
    # The tag's preprocessing and activation, as open_clip applies them for a tag.
    return {
        "pretrained": weights,
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
    }


# ----------------------------------------------------------------------------- devices, numerics


def check_device(device: str) -> str:
    """Refuse, before any work, a device this process cannot run on; return it unchanged.

    Without this, ``--device cuda`` on a machine without a GPU ends in a traceback deep in
    open_clip (or, for open_clip_train, in a warning and a silent fall-back to the CPU).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r}: not a device name ({e})") from None
    if dev.type == "cpu":
        return device
    if dev.type != "cuda":
        raise DeviceError(f"device {device!r}: simgap runs on cpu or cuda")
    if not torch.cuda.is_available():
        why = (
            "this torch is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible here (no driver, or CUDA_VISIBLE_DEVICES hides them)"
        )
        raise DeviceError(f"device {device!r}: {why}; use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"device {device!r}: only {count} CUDA device(s) are visible here")
    return device


def device_key(device: str) -> str:
    """The device part of a stage key: ``cpu``, or ``cuda`` and the GPU model where this process
    sees the GPU (``cuda:NVIDIA H100 80GB HBM3``), so that a result made on one kind of device
    is never taken for another's. The index is left out: ``cuda:0`` and ``cuda:1`` of one node
    are the same kind. A driver that sees no GPU (a Ray head) keys ``cuda`` alone; the embed
    fingerprint of every shard still names its GPU (``numerics_identity``)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return dev.type
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{torch.cuda.get_device_name(index)}"


def numerics_identity(device: str, autocast: torch.dtype | None) -> dict[str, Any]:
    """The numerics a forward on ``device`` runs with, beside the weights and the input: the
    device kind, the autocast dtype (float32 without autocast) and, on a GPU, whether float32
    matmuls and cuDNN convolutions may use TF32 (read now: call it where the forward runs, inside
    ``ieee_fp32``) and the hardware and libraries. cuBLAS and cuDNN promise the same bits only
    on the same architecture, SM count and library versions, so all of them are named."""
    dev = torch.device(device)
    out: dict[str, Any] = {
        "device": dev.type,
        "autocast": str(autocast).removeprefix("torch.") if autocast is not None else "float32",
    }
    if dev.type != "cuda":
        return out
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    out |= tf32_settings()
    out |= {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sms": int(props.multi_processor_count),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    return out


def tf32_settings() -> dict[str, bool]:
    """Whether float32 matmuls (cuBLAS) and convolutions (cuDNN) may run in TF32, by the
    per-backend precision API (torch >= 2.9). "none" means inherit: then the global setting and,
    below it, the legacy flags decide. Reading a legacy flag raises once the new API has set a
    mix, so it is read only when nothing newer says."""
    backends = torch.backends
    matmul = _fp32_precision(backends.cuda.matmul, backends)
    conv = _fp32_precision(backends.cudnn.conv, backends.cudnn, backends)
    if matmul is None:
        matmul = torch.get_float32_matmul_precision() != "highest"
    if conv is None:
        conv = bool(backends.cudnn.allow_tf32)
    return {"tf32_matmul": matmul, "tf32_cudnn": conv}


def _fp32_precision(*levels: Any) -> bool | None:
    for level in levels:
        value = getattr(level, "fp32_precision", "none")
        if value != "none":
            return value == "tf32"
    return None


_ieee_lock = threading.Lock()
_ieee_depth = 0
_ieee_saved: list[tuple[Any, str]] = []


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run the block with float32 GPU matmuls and convolutions in IEEE float32, not TF32.

    torch's default lets cuDNN convolutions (the ViT patch embedding) use TF32, which keeps 10
    mantissa bits: "fp32" on a GPU would silently differ from fp32 on the CPU by ~1e-3. The
    flags are process-wide, so nested and concurrent blocks (trainings evaluated in threads)
    share one setting: the first block in sets it, the last one out restores the caller's.
    Nothing changes for CPU computations."""
    global _ieee_depth
    with _ieee_lock:
        if _ieee_depth == 0:
            targets = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
            _ieee_saved[:] = [(t, t.fp32_precision) for t in targets]
            for t in targets:
                t.fp32_precision = "ieee"
        _ieee_depth += 1
    try:
        yield
    finally:
        with _ieee_lock:
            _ieee_depth -= 1
            if _ieee_depth == 0:
                for t, value in _ieee_saved:
                    t.fp32_precision = value
