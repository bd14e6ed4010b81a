"""Names taken from files or callers cannot point outside the folder they are joined to."""

import pytest

from velotune.errors import CheckpointError, ConfigError
from velotune.export.ollama import write_modelfile
from velotune.paths import plain_file_name


@pytest.mark.parametrize(
    "name",
    ["../x", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "..\\..\\x", "..", ".", "", "x\0y", None, 3, b"x"],
)
def test_paths_and_non_names_are_refused_with_the_given_error(name):
    with pytest.raises(CheckpointError, match="shard"):
        plain_file_name(name, "shard", CheckpointError)


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors", "..x", "a..b", "x y"])
def test_plain_names_pass_unchanged(name):
    assert plain_file_name(name, "shard", CheckpointError) is name


@pytest.mark.parametrize("name", ["../model.F16.gguf", "/tmp/model.gguf", "sub/model.gguf"])
def test_a_modelfile_cannot_point_at_a_gguf_outside_its_folder(tmp_path, name):
    with pytest.raises(ConfigError, match="not a plain file name"):
        write_modelfile(str(tmp_path), name, tokenizer=None)
    assert not (tmp_path / "Modelfile").exists()
