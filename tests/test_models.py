"""simgap.models: name grammar, checkpoints, identity, offline failure of pretrained tags."""

from __future__ import annotations

import hashlib
import json
import urllib.error
from pathlib import Path

import open_clip
import open_clip.pretrained
import pytest
import torch
from PIL import Image

from simgap.models import (
    LoadedModel,
    ModelLoadError,
    ModelSpec,
    load_model,
    model_identity,
    register_shipped_configs,
    shipped_configs_dir,
)

TINY = ModelSpec("simgap-tiny")


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(TINY, allow_random=True)


def _outputs(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    image = loaded.preprocess(Image.new("RGB", (40, 30), (200, 10, 90))).unsqueeze(0)
    tokens = loaded.tokenizer(["a red square", "a photo of a dog"])
    with torch.no_grad():
        return loaded.model.encode_image(image), loaded.model.encode_text(tokens)


def _perturbed_state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    # Weights different from the seeded random init, so a round trip proves they were loaded.
    gen = torch.Generator().manual_seed(123)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in loaded.model.state_dict().items()
    }


def test_shipped_config_loads_with_allow_random(tiny):
    assert not tiny.model.training
    image_emb, text_emb = _outputs(tiny)
    assert image_emb.shape == (1, 64) and text_emb.shape == (2, 64)
    assert tiny.identity == {"arch": "simgap-tiny", "pretrained": None, "checkpoint_sha256": None}


def test_random_init_is_seeded(tiny):
    again = load_model(TINY, allow_random=True)
    for a, b in zip(_outputs(tiny), _outputs(again), strict=True):
        assert torch.equal(a, b)


def test_weights_are_required():
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(TINY)


def test_register_shipped_configs_is_idempotent():
    register_shipped_configs()
    paths = list(open_clip.factory._MODEL_CONFIG_PATHS)
    register_shipped_configs()
    assert open_clip.factory._MODEL_CONFIG_PATHS == paths
    assert "simgap-tiny" in open_clip.list_models()


@pytest.mark.parametrize("wrapped", [True, False], ids=["open_clip_train-checkpoint", "raw"])
def test_checkpoint_round_trip(tiny, tmp_path, wrapped):
    state = _perturbed_state(tiny)
    if wrapped:
        # What open_clip_train writes under DDP: keys prefixed "module.", plus epoch/optimizer.
        payload = {
            "epoch": 3,
            "name": "x",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "optimizer": {"state": {}, "param_groups": []},
        }
    else:
        payload = state
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)

    loaded = load_model(ModelSpec("simgap-tiny", checkpoint=path))
    reference = load_model(TINY, allow_random=True)
    reference.model.load_state_dict(state)
    for a, b in zip(_outputs(loaded), _outputs(reference), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(_outputs(loaded)[0], _outputs(tiny)[0])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.identity == {"arch": "simgap-tiny", "pretrained": None, "checkpoint_sha256": sha}
    assert model_identity(ModelSpec("simgap-tiny", checkpoint=str(path))) == loaded.identity


def test_checkpoint_of_another_arch_is_a_load_error(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, path)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelSpec("simgap-tiny", checkpoint=path))


def test_missing_checkpoint_and_unknown_arch():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelSpec("simgap-tiny", checkpoint="/nonexistent/ckpt.pt"))
    with pytest.raises(ModelLoadError, match="unknown model architecture"):
        load_model(ModelSpec("simgap-tinny"), allow_random=True)


def test_pretrained_tag_offline_says_how_to_pass_a_checkpoint(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (simulated)")

    # Simulated, so the test never downloads 800 MB on a machine that does have network.
    monkeypatch.setattr(open_clip.pretrained.urllib.request, "urlopen", offline)
    spec = ModelSpec("ViT-B-16-plus-240", pretrained="laion400m_e32")
    with pytest.raises(ModelLoadError) as err:
        load_model(spec, cache_dir=str(tmp_path))
    message = str(err.value)
    assert "laion400m_e32" in message and "checkpoint=" in message
    assert "vit_b_16_plus_240-laion400m_e32-699c4b84.pt" in message  # what to download
    assert isinstance(err.value, ValueError)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelLoadError, match="laion400m_e32"):
        load_model(ModelSpec("ViT-B-16-plus-240", pretrained="laion400m_e99"))


def test_tag_with_local_file_checks_its_hash(tmp_path):
    path = tmp_path / "not-the-weights.pt"
    path.write_bytes(b"not the laion400m_e32 weights")
    spec = ModelSpec("ViT-B-16-plus-240", pretrained="laion400m_e32", checkpoint=str(path))
    with pytest.raises(ModelLoadError, match="699c4b84"):
        load_model(spec)


def test_local_dir(tiny, tmp_path):
    cfg = json.loads((shipped_configs_dir() / "simgap-tiny.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    state = _perturbed_state(tiny)
    torch.save(state, folder / "open_clip_pytorch_model.bin")

    loaded = load_model(ModelSpec(f"local-dir:{folder}"))
    sha = hashlib.sha256((folder / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    assert loaded.identity["checkpoint_sha256"] == sha
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert list(loaded.preprocess.transforms[-1].mean) == [0.5, 0.5, 0.5]  # folder's preprocessing


def test_local_dir_without_weights_or_with_extra_weights(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load_model(ModelSpec(f"local-dir:{tmp_path}"))
    with pytest.raises(ModelLoadError, match="carries its own weights"):
        ModelSpec(f"local-dir:{tmp_path}", checkpoint=str(Path(tmp_path) / "x.pt"))
