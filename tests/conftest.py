"""Shared fixtures: an isolated environment and tiny random models built from a config.

The environment variables are set before zenml/transformers/great_expectations are
imported anywhere in the test session, so nothing reaches a hub or rewrites the
repository's `.zen/` config.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ches_curate_tests_"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
os.environ.update(
    {
        "ZENML_CONFIG_PATH": str(_SESSION_TMP / "zenml_config"),
        "ZENML_REPOSITORY_PATH": str(_SESSION_TMP / "zenml_repo"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_LOGGING_VERBOSITY": "WARN",
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CHES_CURATE_HOME": str(_SESSION_TMP / "home"),
    }
)
os.environ.pop("CHES_CURATE_DB", None)

import pytest  # noqa: E402

from ches_curate.testing.tiny_models import build_tiny_model  # noqa: E402

SHARED_HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine the threads spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tiny_llama_dir(session_tmp) -> Path:
    """A tiny random Llama with a ChatML chat template, saved as a local model directory."""
    return build_tiny_model(session_tmp / "tiny_llama", arch="llama", chat_template=True)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(session_tmp) -> Path:
    """A tiny random GPT-2 (absolute positions, no chat template), saved as a local model directory."""
    return build_tiny_model(session_tmp / "tiny_gpt2", arch="gpt2", chat_template=False)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    """The tiny Llama loaded once per test module (modules that train get their own copy)."""
    from ches_curate.models import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def shared_hh_path() -> Path:
    if not SHARED_HH.exists():
        pytest.skip(f"shared data not found at {SHARED_HH}")
    return SHARED_HH
