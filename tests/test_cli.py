"""The `osd` command line: docs in sync, bad input as one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from osd.config_doc import all_config_models, config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text().strip() == config_reference(all_config_models()).strip(), \
        "docs/configuration.md is stale: regenerate it with `.venv/bin/osd config-doc > docs/configuration.md`"


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--max-tokens", "0"], "invalid max_tokens"),
    (["generate", "hi", "--temperature", "-1"], "invalid temperature"),
    (["generate", "hi", "--top-p", "1.5"], "invalid top_p"),
    (["generate", "hi", "--target", "/no/such/model"], "not found"),
    (["generate", "hi", "--draft-layers", "a,b"], "comma-separated layer indices"),
])
def test_bad_input_is_a_one_line_error(argv, message):
    proc = subprocess.run([sys.executable, "-m", "osd.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
