"""Schemathesis over every route of /schema/openapi.json against a real `parley serve`.

A small example budget runs in `make test`; `make fuzz` runs a larger one (PARLEY_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


@pytest.mark.e2e
def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: Any) -> None:
    base, _, tmp_path = server
    key = (tmp_path / "data" / "dev-api-key").read_text().strip()
    examples = os.environ.get("PARLEY_FUZZ_EXAMPLES", "8")
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "--no-color",
            "run",
            f"{base}/schema/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            examples,
            "--seed",
            os.environ.get("PARLEY_FUZZ_SEED", "20261128"),
            "--exclude-path-regex",
            "^/(schema|metrics)",
        ],
        env={**os.environ, "PARLEY_FUZZ_KEY": key},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
