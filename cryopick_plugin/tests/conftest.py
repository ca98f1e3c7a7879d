"""Test session setup: a throw-away headless Scipion, configured before pyworkflow is imported."""
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix='cryopick-tests-')
os.environ['CRYOPICK_HOME'] = _HOME
os.environ['SCIPION_USER_DATA'] = os.path.join(_HOME, 'ScipionUserData')
for _var in ('SCIPION_HOME', 'SCIPION_TESTS', 'SCIPION_HOSTS'):
    os.environ.pop(_var, None)

from cryopick_plugin import headless  # noqa: E402

headless.configure(_HOME)

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get('CRYOPICK_KEEP_TEST_DATA'):
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope='session')
def templates_dir():
    """The real density maps shipped in shared/data (None where the checkout has none)."""
    from cryopick_plugin.engine.settings import default_templates_dir
    return default_templates_dir()
