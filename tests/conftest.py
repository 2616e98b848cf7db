import pytest
import torch

from simgap.models import ModelSpec, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A seeded-random simgap-tiny saved as a plain state dict (nothing is downloaded)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(load_model(ModelSpec("simgap-tiny"), allow_random=True).model.state_dict(), path)
    return ModelSpec("simgap-tiny", checkpoint=str(path))
