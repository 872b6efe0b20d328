"""What a training forward hands the Monitor besides plain batches. Padded batches (probes/padding.py):
a Hugging Face model called with an attention_mask is measured on its tokens alone, exactly as on the
same sequences one by one without padding, and what cannot be measured that way is refused in one
line. Activation checkpointing: the forward that backward runs again is not measured twice."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankprobe import Monitor  # noqa: E402
from rankprobe.errors import UserError  # noqa: E402
from rankprobe.probes.families import SUPPORTED  # noqa: E402
from test_families import config  # noqa: E402

V, LONG, SHORT = 64, 12, 7
METRICS = ("n", "pr", "erank", "stable_rank", "rankme", "entropy", "entropy_norm", "max_logit", "entropy_max",
           "n_rows", "seq_len")


def llama(impl: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=V, max_position_embeddings=64)
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg).double().eval()


def measure(model, calls, attention=True) -> dict:
    """Rows of one measured step whose forwards are `calls` (keyword arguments), by (kind, tap, tensor, layer)."""
    m = Monitor(model, every=1, weights=False, attention=attention)
    try:
        with m.watch(0):  # an error in the step removes the hooks
            for kwargs in calls:
                model(**kwargs)
    finally:
        m.close()
    rows = m.last
    return {(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]): r for r in rows}


def padded(a: torch.Tensor, b: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`a` (shorter) and `b` as one (2, len(b)) batch, `a` padded with token 0 on the right or left."""
    ids, mask = torch.zeros(2, len(b), dtype=torch.long), torch.zeros(2, len(b), dtype=torch.long)
    span = slice(len(b) - len(a), None) if left else slice(0, len(a))
    ids[0, span], mask[0, span] = a, 1
    ids[1], mask[1] = b, 1
    return ids, mask


def assert_rows_equal(got: dict, want: dict, skip_taps=(), rel=1e-7) -> None:
    assert set(got) == set(want)
    compared = 0
    for key, row in got.items():
        if key[1] in skip_taps:
            continue
        for m in METRICS:
            if m in row:
                assert row[m] == pytest.approx(want[key][m], rel=rel, abs=1e-9), (key, m)
                compared += 1
    assert compared > 50


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_batches_measure_the_tokens_as_the_sequences_alone(impl):
    """Right padding: every tap and the attention lens equal the two sequences fed one by one. Left
    padding shifts the model's absolute positions (no position_ids), which rotates the post-RoPE taps
    but leaves q·k, so the attention lens and the pre-RoPE taps equal too; with position_ids counting
    the tokens, every tap does. Unmasked, the padding's keys would count (n) and bias every spectrum."""
    model = llama(impl)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, V, (SHORT,), generator=g), torch.randint(1, V, (LONG,), generator=g)
    alone = measure(model, [dict(input_ids=a[None]), dict(input_ids=b[None])])
    assert alone[("probe", "proj", "k", 0)]["n"] == SHORT + LONG

    ids, mask = padded(a, b, left=False)
    assert_rows_equal(measure(model, [dict(input_ids=ids, attention_mask=mask)]), alone)
    ids, mask = padded(a, b, left=True)
    assert_rows_equal(measure(model, [dict(input_ids=ids, attention_mask=mask)]), alone, skip_taps=("rope",))
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    assert_rows_equal(measure(model, [dict(input_ids=ids, attention_mask=mask, position_ids=positions)]), alone)


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_family_measures_a_right_padded_batch_as_its_sequences_alone(name):
    """Each supported family's own attention masks the padding as the Monitor measures it (its mask is
    checked against the padding: probes/families.py): every row equals the sequences fed one by one."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(name)).eval()
    g = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = torch.randint(1, vocab, (SHORT,), generator=g), torch.randint(1, vocab, (LONG,), generator=g)
    alone = measure(model, [dict(input_ids=a[None]), dict(input_ids=b[None])])
    ids, mask = padded(a, b, left=False)
    assert_rows_equal(measure(model, [dict(input_ids=ids, attention_mask=mask)]), alone, rel=1e-5)


def test_what_padding_cannot_say_is_refused_in_one_line():
    model = llama("sdpa")
    ids = torch.randint(1, V, (2, LONG))
    hole = torch.ones(2, LONG, dtype=torch.long)
    hole[0, 5] = 0  # padding between tokens
    with pytest.raises(UserError, match="padding between its tokens"):
        measure(model, [dict(input_ids=ids, attention_mask=hole)])
    with pytest.raises(UserError, match="not a \\(batch, sequence\\) mask of 0s and 1s"):
        measure(model, [dict(input_ids=ids, attention_mask=torch.ones(2, 1, LONG, LONG))])
    # packed documents: position_ids restart inside a row; the spectra are still measured
    packed = torch.cat([torch.arange(5), torch.arange(LONG - 5)]).repeat(2, 1)
    with pytest.raises(UserError, match="position_ids restart inside a row"):
        measure(model, [dict(input_ids=ids, position_ids=packed)])
    rows = measure(model, [dict(input_ids=ids, position_ids=packed)], attention=False)
    assert rows and all(k[0] == "probe" for k in rows) and rows[("probe", "proj", "k", 0)]["n"] == 2 * LONG



@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointings_second_forward_is_not_measured_again(reentrant):
    """With activation checkpointing, backward runs each layer's forward again, hooks included: the
    measured step's rows are those of the same step without checkpointing, not its tokens twice."""
    model = llama("sdpa").train()
    ids = torch.randint(1, V, (2, LONG), generator=torch.Generator().manual_seed(2))

    def rows() -> dict:
        m = Monitor(model, every=1, weights=False, background=False)
        with m.watch(0):
            model(input_ids=ids, labels=ids).loss.backward()
        m.close()
        return {(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]): r for r in m.last}

    plain = rows()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = rows()
    assert plain[("probe", "proj", "k", 0)]["n"] == 2 * LONG
    assert_rows_equal(checkpointed, plain)


@pytest.mark.parametrize("reentrant", [False, True])
def test_padded_batches_under_activation_checkpointing_two_forwards_then_one_backward(reentrant):
    """Padding and checkpointing together, in a step of two forwards (two padded batches) before one
    backward: the lens's own work saves nothing for autograd (the recompute would find other saved
    tensors), and the recompute is not checked against the other forward's padding."""
    model = llama("sdpa").train()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, V, (n,), generator=g) for n in (SHORT, LONG, 5, LONG)]
    batches = [padded(seqs[0], seqs[1], left=False), padded(seqs[2], seqs[3], left=True)]

    def rows(checkpointing: bool) -> dict:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m = Monitor(model, every=1, weights=False, background=False)
        with m.watch(0):
            loss = sum(model(input_ids=ids, attention_mask=mask, labels=ids).loss for ids, mask in batches)
            loss.backward()
        m.close()
        model.gradient_checkpointing_disable()
        return {(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]): r for r in m.last}

    plain = rows(False)
    assert plain[("probe", "proj", "k", 0)]["n"] == sum(len(x) for x in seqs)
    assert_rows_equal(rows(True), plain)


def test_a_padded_batch_of_one_token_rows_still_holds_the_layer():
    """Under DDP every rank merges the same layers' sums: a rank whose measured rows are all one token
    long (no attention rows to add) must still hold the layer, empty."""
    from rankprobe.probes.attention import AttentionStats

    stats = AttentionStats()
    q, k = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 1, 8)
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep[:, 0] = True
    stats.add_padded(0, q, k, keep, 8 ** -0.5)
    assert list(stats.layers) == [0] and stats.layers[0]["rows"] == 0
