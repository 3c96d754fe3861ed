"""Session set-up: no test, and no process a test starts, uses the user's model cache.

LLMSH_HOME points at the suite's own cache (cli_fixtures.DEFAULT_MODEL_HOME, ./.llmsh-home,
ignored by git) for the whole session, whatever the environment says; tests that need an empty
cache override it per test with the ``llmsh_home`` fixture.
"""

import os

from cli_fixtures import DEFAULT_MODEL_HOME


def pytest_configure(config):
    os.environ["LLMSH_HOME"] = str(DEFAULT_MODEL_HOME)
    os.environ.pop("LLMSH_MODEL", None)
