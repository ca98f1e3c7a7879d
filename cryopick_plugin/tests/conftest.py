"""Shared fixtures. The Scipion environment itself is set up by the repository's root conftest.py."""
import pytest


@pytest.fixture(scope='session')
def templates_dir():
    """The real density maps shipped in shared/data (None where the checkout has none)."""
    from cryopick_plugin.engine.settings import default_templates_dir
    return default_templates_dir()
