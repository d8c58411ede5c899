import pytest

import janus_decoding
from janus_decoding.models.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_checkpoint(folder, seed=0)
    return janus_decoding.load_model(str(folder))
