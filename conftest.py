"""Test session setup: a throw-away headless Scipion, configured before pyworkflow (or the plugin) is imported.

This file sits at the repository root so pytest loads it before it imports the `cryopick_plugin` package
(whose import configures Scipion from the environment).
"""
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix='cryopick-tests-')
os.environ['CRYOPICK_HOME'] = _HOME
os.environ['SCIPION_USER_DATA'] = os.path.join(_HOME, 'ScipionUserData')
for _var in ('SCIPION_HOME', 'SCIPION_TESTS', 'SCIPION_HOSTS'):
    os.environ.pop(_var, None)


HARDWARE_SKIP = 'hardware:'


def _hardware_skip(report):
    """True for a skip whose reason starts with HARDWARE_SKIP (pytest stores it as 'Skipped: <reason>')."""
    longrepr = getattr(report, 'longrepr', None)
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or '')
    return reason.removeprefix('Skipped: ').strip().startswith(HARDWARE_SKIP)


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get('CRYOPICK_KEEP_TEST_DATA'):
        shutil.rmtree(_HOME, ignore_errors=True)
    # Under CI every test must run: a skip means something the setup should have installed is missing.
    # The one exception is hardware no setup can install (a skip reason starting 'hardware:', e.g. bf16
    # cases on a CPU without native bf16 and no GPU).
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    skipped = len([r for r in reporter.stats.get('skipped', []) if not _hardware_skip(r)]) if reporter else 0
    if os.environ.get('CI', '').lower() == 'true' and skipped and session.exitstatus == 0:
        if reporter:
            reporter.write_line(f'CI: {skipped} test(s) skipped; every test must run under CI', red=True)
        session.exitstatus = 1
