"""Model folder manifests: malformed fields are ManifestErrors naming the file and the field."""

import json

import pytest

from rar_edge.errors import ManifestError
from rar_edge.manifest import FORMAT, FORMAT_VERSION, load_manifest


def _write(tmp_path, **fields):
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "image_embedder", "files": {}, **fields}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"format_version": "1.0"}, "format_version must be an integer"),
        ({"format_version": None}, "format_version must be an integer"),
        ({"format_version": FORMAT_VERSION + 1}, "this rar_edge reads"),
        ({"files": ["model.onnx"]}, "'files' must map each role"),
        ({"files": {"image": "model.onnx"}}, "'files' must map each role"),
        ({"embedding_dim": "abc"}, "embedding_dim must be a positive integer"),
        ({"embedding_dim": 0}, "embedding_dim must be a positive integer"),
        ({"kind": "toaster"}, "unknown kind"),
    ],
)
def test_malformed_manifests_are_refused_by_name(tmp_path, fields, message):
    folder = _write(tmp_path, **fields)
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(folder, verify=False)
    assert "manifest.json" in str(e.value)


def test_a_well_formed_manifest_loads(tmp_path):
    m = load_manifest(_write(tmp_path, embedding_dim=8), verify=False)
    assert m.embedding_dim == 8 and m.kind == "image_embedder"
