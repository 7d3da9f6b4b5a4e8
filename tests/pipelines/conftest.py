from pathlib import Path

import pytest
import yaml

from tests.pipelines.toy import TOY


@pytest.fixture
def toy_config(tmp_path) -> Path:
    """The toy project's config (`tests.pipelines.toy.TOY`) as a YAML file."""
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(TOY))
    return p
