import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# no plain progress lines in the commands' stderr: on a busy machine they would appear between the
# lines the tests read (tests/test_calibrate_cli.py tests them on their own)
os.environ.setdefault("NORMSURGEON_PROGRESS", "0")
torch.set_num_threads(1)  # the suite runs under xdist on 2 cores: one thread per worker
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture
def zoo_model():
    from normsurgeon import zoo

    def build(name):
        model = zoo.MODELS[name]()
        return model, model.example_inputs()

    return build
