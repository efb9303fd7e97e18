"""Shared fixtures: the real assets (built by ../shared/tools, paths from the environment) and data files."""
import os
from pathlib import Path

import pytest

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores (measured)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_dir():
    path = os.environ.get("CUT_SMOLLM2")
    if not path or not Path(path, "model.safetensors").exists():
        pytest.skip("set CUT_SMOLLM2 to a directory built by ../shared/tools/get_smollm2.sh")
    return Path(path)


@pytest.fixture(scope="session")
def llama3_tokenizer_file():
    path = os.environ.get("CUT_LLAMA3_TOKENIZER")
    if not path or not Path(path).exists():
        pytest.skip("set CUT_LLAMA3_TOKENIZER to a file built by ../shared/tools/get_llama3_tokenizer.sh")
    return Path(path)


@pytest.fixture(scope="session")
def family_dir():
    path = os.environ.get("CUT_FAMILY_TOKENIZERS")
    if not path or not Path(path, "llama-2.tokenizer.model").exists():
        pytest.skip("set CUT_FAMILY_TOKENIZERS to a directory built by ../shared/tools/get_family_tokenizers.sh")
    return Path(path)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
