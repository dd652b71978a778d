import os

import pytest
import torch
from support.ray_fixtures import ray_session  # noqa: F401  (one session-scoped Ray for every module)
from support.redis_fixtures import *  # noqa: F401,F403

# Tiny models gain nothing from threads, and OpenMP spinning on a shared 2-core
# machine made them ~8x slower; SmolLM2 tests ask for more threads themselves.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2 target, its tokenizer and the default 2-layer self-draft, as `make run` loads them
    on a CPU without bf16 instructions: float32, the faster weight layout measured at load (dtype "auto" would
    pick bf16 on AVX512-BF16 machines; tests/decoding/test_bf16.py covers bf16)."""
    from osd.config import ModelConfig
    from osd.decoding.engine import build_engine

    engine = build_engine(ModelConfig(dtype="float32"))
    return engine.target, engine.tokenizer, engine.draft


@pytest.fixture
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)
