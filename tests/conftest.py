"""Session set-up: no test, and no process a test starts, uses the user's model cache.

LLMSH_HOME points at the suite's own cache (cli_fixtures.DEFAULT_MODEL_HOME, ./.llmsh-home,
ignored by git) for the whole session, whatever the environment says; tests that need an empty
cache override it per test with the ``llmsh_home`` fixture. The conversation log goes to a
temporary folder of the session (LLMSH_LOG_PATH), never the shared cache or the user's data
folder; tests of the log point LLMSH_LOG_PATH at their own tmp_path.
"""

import atexit
import os
import shutil
import tempfile

from cli_fixtures import DEFAULT_MODEL_HOME


def pytest_configure(config):
    os.environ["LLMSH_HOME"] = str(DEFAULT_MODEL_HOME)
    os.environ.pop("LLMSH_MODEL", None)
    log_dir = tempfile.mkdtemp(prefix="llmsh-test-log-")
    atexit.register(shutil.rmtree, log_dir, ignore_errors=True)
    os.environ["LLMSH_LOG_PATH"] = os.path.join(log_dir, "logs.db")
    os.environ.pop("LLMSH_LOG", None)
