"""Full-size VAR transformers built on the meta device have exactly the official state-dict keys and shapes."""

from __future__ import annotations

import json

import pytest
import torch

from fastvar.models.var import VAR

from .parity.conftest import manifest_files

VAR_MANIFESTS = [p for p in manifest_files("var") if p.name.startswith("var_")]


def test_all_var_manifests_found():
    assert len(VAR_MANIFESTS) >= 5


@pytest.mark.parametrize("path", VAR_MANIFESTS, ids=lambda p: p.stem)
def test_var_state_dict_matches_manifest(path):
    man = json.loads(path.read_text())
    kw = man["constructor_kwargs"]
    bk = man["builder_kwargs"]
    with torch.device("meta"):
        model = VAR(
            vocab_size=bk["V"], cvae=bk["Cvae"], num_classes=kw["num_classes"], depth=kw["depth"],
            embed_dim=kw["embed_dim"], num_heads=kw["num_heads"], patch_nums=kw["patch_nums"],
            mlp_ratio=kw["mlp_ratio"], shared_aln=kw["shared_aln"], norm_eps=kw["norm_eps"],
        )
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    theirs = [(k, list(s), d) for k, s, d in man["state_dict"]]
    assert ours == theirs
    assert sum(v.numel() for k, v in model.named_parameters()) == man["num_params"]


def test_registry_matches_manifests():
    from fastvar.models.registry import get_spec

    for path in VAR_MANIFESTS:
        man = json.loads(path.read_text())
        spec = get_spec(f"var-d{man['builder_kwargs']['depth']}")
        assert list(spec.config["patch_nums"]) == man["builder_kwargs"]["patch_nums"]
        assert spec.config["shared_aln"] == man["builder_kwargs"]["shared_aln"]
        assert spec.config["embed_dim"] == man["constructor_kwargs"]["embed_dim"]
