"""Reading a checkpoint never runs code: a pickled object is refused naming the file; a damaged file too."""

import pytest
import torch

from pipelines.checkpoint import read_checkpoint
from pipelines.tracking import ConfigError


class Payload:
    def __reduce__(self):  # what a crafted checkpoint does: call something on unpickling
        return (print, ("this must never run",))


def test_plain_checkpoint_reads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "practicum": {"class_path": "a.B"}}, path)
    assert read_checkpoint(path)["practicum"] == {"class_path": "a.B"}


def test_pickled_payload_is_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(ConfigError, match=r"crafted\.ckpt.*could run code"):
        read_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"cut\.ckpt is corrupt or truncated"):
        read_checkpoint(path)
