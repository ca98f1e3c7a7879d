"""Shared fixtures. The Scipion environment itself is set up by the repository's root conftest.py."""
import pytest

from cryopick_plugin.tests.hardware import PRECISIONS, bf16_unavailable


@pytest.fixture(scope='session')
def templates_dir():
    """The real density maps shipped in shared/data (None where the checkout has none)."""
    from cryopick_plugin.engine.settings import default_templates_dir
    return default_templates_dir()


@pytest.fixture(params=PRECISIONS)
def precision(request, monkeypatch):
    """'fp32' or 'bf16' (see hardware.py), also set as $CRYOPICK_PRECISION so that commands and child
    processes use it; the bf16 case is skipped, as hardware, where nothing here computes bf16 natively."""
    from cryopick_plugin.engine.settings import PRECISION_VAR
    if request.param == 'bf16':
        reason = bf16_unavailable()
        if reason:
            pytest.skip(reason)
    monkeypatch.setenv(PRECISION_VAR, request.param)
    return request.param
