"""pytest fixtures: the tiny-random target and a draft blended 30% towards another tiny Llama (module scope).

Import into a test module with `from tests.tiny_pair_fixtures import *`. The blend keeps the draft close
enough to the target that most proposals are accepted, and different enough that rejections happen.
"""

from __future__ import annotations

import pytest

from draftwire.shared.models.runtime import load_model
from tests.toy_models import blend, tiny_llama

__all__ = ["draft", "target"]


@pytest.fixture(scope="module")
def target():
    return load_model("tiny-random", "fp32", progress=False)


@pytest.fixture(scope="module")
def draft(target):
    return blend(target, tiny_llama(seed=1), 0.3)
