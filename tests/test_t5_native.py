"""The pure-torch T5 encoder equals transformers' T5EncoderModel key for key and output for output."""

from __future__ import annotations

import pytest
import torch

from fastvar.text.t5_native import T5Encoder, T5EncoderConfig, load_t5_folder, load_t5_state, relative_position_buckets

transformers = pytest.importorskip("transformers", reason="the reference T5 needs the test extra (transformers)")

# short buckets and distance so a 20-token input reaches the log-spaced and the clamped buckets
_ARCH = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=12, dropout_rate=0.0, layer_norm_epsilon=1e-6)


def _pair(ffn: str, seed: int = 0) -> tuple[torch.nn.Module, T5Encoder]:
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(**_ARCH, feed_forward_proj=ffn, pad_token_id=0)).eval()
    with torch.no_grad():  # the reference init gives the norms weight 1: make them matter
        for n, p in ref.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
    ours = T5Encoder(T5EncoderConfig.from_dict(ref.config.to_dict())).eval()
    load_t5_state(ours, ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_same_keys_and_outputs_with_and_without_padding(ffn):
    ref, ours = _pair(ffn)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, _ARCH["vocab_size"], (3, 20), generator=g)
    lens = [20, 13, 4]
    mask = torch.zeros(3, 20, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        ids[i, n:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        want_m = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got_m = ours(ids, mask)
    for i, n in enumerate(lens):  # valid rows equal; padding changes them (so the mask is really applied)
        torch.testing.assert_close(got_m[i, :n], want_m[i, :n], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_m[1, :13], got[1, :13], atol=1e-3)
    # a padded caption's valid rows equal the same caption encoded alone
    with torch.no_grad():
        alone = ours(ids[2:3, :4])
    torch.testing.assert_close(got_m[2, :4], alone[0], atol=1e-5, rtol=1e-5)


def test_buckets_match_reference():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(30)[None, :] - torch.arange(30)[:, None]
    want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=8, max_distance=12)
    assert torch.equal(relative_position_buckets(30, 30, 8, 12), want)
    # exact (0, 1), log-spaced and clamped buckets on both sides (4 would be 'offset 0, key after query')
    assert set(want.flatten().tolist()) == {0, 1, 2, 3, 5, 6, 7}


def test_full_checkpoint_loads_and_bad_one_names_keys():
    ref, ours = _pair("gated-gelu", seed=3)
    full = dict(ref.state_dict())
    full.pop("encoder.embed_tokens.weight")  # tied: stored once, as in released safetensors
    full["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(1)
    full["lm_head.weight"] = torch.zeros(1)
    fresh = T5Encoder(ours.config)
    load_t5_state(fresh, full)
    assert torch.equal(fresh.encoder.embed_tokens.weight, ref.shared.weight)
    del full["encoder.final_layer_norm.weight"]
    with pytest.raises(ValueError, match="final_layer_norm"):
        load_t5_state(T5Encoder(ours.config), full)


def test_config_rejects_unknown_activation():
    with pytest.raises(ValueError, match="feed_forward_proj 'swish-x'"):
        T5EncoderConfig(vocab_size=4, feed_forward_proj="swish-x")


def test_loads_a_saved_encoder_decoder_folder(tmp_path):
    # a full T5 (encoder + decoder + LM head) saved the way released checkpoints are, loaded without transformers
    torch.manual_seed(5)
    full = transformers.T5ForConditionalGeneration(transformers.T5Config(**_ARCH, feed_forward_proj="gated-gelu"))
    full.save_pretrained(tmp_path)
    ours = load_t5_folder(tmp_path)
    ids = torch.randint(3, _ARCH["vocab_size"], (2, 9))
    with torch.no_grad():
        want = full.get_encoder()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(ours(ids), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_t5_folder(tmp_path / "nothing")
