"""select_step, selection_digest and the step schedule."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.policies import valid_weight_mask
from es_llm.sampling.schedule import Phase, anneal_start_step, phase_for_step, resolve_burn_in_steps
from es_llm.sampling.scores import ScoreTable
from es_llm.sampling.selector import (
    device_digest,
    importance_weights,
    select_step,
    selection_digest,
)


def batch(n: int = 32, seed: int = 0, base: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(base, base + n, dtype=torch.int64)
    losses = torch.rand(n, generator=g) * 4 + 0.1
    prev = torch.rand(n, generator=g) + 0.05
    return ids, losses, prev


# --- digest ---


def test_digest_is_sha1_of_int64_little_endian():
    ids = [0, 1, 2**31, 2**62, 2**63 - 1, -5]
    want = hashlib.sha1(b"".join(struct.pack("<q", i) for i in ids)).hexdigest()
    assert selection_digest(torch.tensor(ids, dtype=torch.int64)) == want
    assert selection_digest(torch.tensor(ids[:2], dtype=torch.int32)) == selection_digest(
        torch.tensor(ids[:2], dtype=torch.int64)
    )


def test_digest_distinguishes_ids_floats_would_merge_and_order():
    a = torch.tensor([2**62, 2**62 + 1], dtype=torch.int64)
    b = torch.tensor([2**62, 2**62 + 2], dtype=torch.int64)
    assert selection_digest(a) != selection_digest(b)
    assert selection_digest(a) != selection_digest(a.flip(0))
    with pytest.raises(TypeError):
        selection_digest(a.double())


# --- select_step ---


def test_selection_is_deterministic_in_seed_and_step():
    cfg = EvolvedSamplingConfig()
    ids, losses, prev = batch(64)
    kw = dict(ids=ids, losses=losses, prev_scores=prev, valid=None, k=16)
    a = select_step(cfg, step=5, seed=1, **kw)
    b = select_step(cfg, step=5, seed=1, **kw)
    assert torch.equal(a.positions, b.positions)
    digests = {
        selection_digest(ids[select_step(cfg, step=s, seed=1, **kw).positions])
        for s in range(5, 15)
    }
    assert len(digests) == 10
    assert a.positions.numel() == 16 and torch.equal(a.positions, torch.sort(a.positions).values)
    assert torch.equal(a.loss_weights, torch.ones(16))
    assert a.num_invalid.dtype == torch.int64 and a.num_invalid.shape == ()
    assert int(a.num_invalid) == 0
    assert torch.allclose(a.weights, 0.2 * prev + 0.8 * losses)
    assert torch.allclose(a.new_scores, 0.8 * prev + 0.2 * losses)


def test_invalid_samples_keep_scores_and_are_not_chosen():
    cfg = EvolvedSamplingConfig()
    ids, losses, prev = batch(20)
    losses[3] = float("nan")
    losses[4] = float("inf")
    valid = torch.ones(20, dtype=torch.bool)
    valid[[7, 8]] = False
    for step in range(30):
        sel = select_step(
            cfg, step=step, seed=0, ids=ids, losses=losses, prev_scores=prev, valid=valid, k=10
        )
        assert not set(sel.positions.tolist()) & {3, 4, 7, 8}
    for i in (3, 4, 7, 8):
        assert sel.new_scores[i] == prev[i]
    # writing back through the table leaves them untouched
    t = ScoreTable(20, s_init=0.5)
    t.update(ids, sel.new_scores, valid & torch.isfinite(losses))
    assert not t.scored_mask()[[3, 4, 7, 8]].any() and t.scored_mask().sum() == 16


def test_filler_gets_zero_loss_weight():
    cfg = EvolvedSamplingConfig()
    ids, losses, prev = batch(8)
    valid = torch.tensor([False, True, False, True, False, False, True, False])
    sel = select_step(
        cfg, step=0, seed=0, ids=ids, losses=losses, prev_scores=prev, valid=valid, k=5
    )
    assert sel.positions.tolist() == [0, 1, 2, 3, 6]
    assert sel.loss_weights.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert int(sel.num_invalid) == 2


def test_importance_weights_inverse_to_weight_with_mean_one():
    cfg = EvolvedSamplingConfig(importance_weighting=True)
    ids, losses, prev = batch(40)
    valid = torch.ones(40, dtype=torch.bool)
    valid[0] = False
    sel = select_step(
        cfg, step=2, seed=4, ids=ids, losses=losses, prev_scores=prev, valid=valid, k=39
    )
    assert 0 not in sel.positions.tolist()
    w = sel.weights[sel.positions].double()
    lw = sel.loss_weights.double()
    assert lw.mean().item() == pytest.approx(1.0, rel=1e-6)
    # lw_i * w_i is constant: weights proportional to 1 / (w_i / sum w)
    prod = lw * w
    assert torch.allclose(prod, prod.mean().expand_as(prod), rtol=1e-5)
    # filler in IW mode is still 0
    v2 = torch.zeros(40, dtype=torch.bool)
    v2[:3] = True
    sel2 = select_step(cfg, step=2, seed=4, ids=ids, losses=losses, prev_scores=prev, valid=v2, k=5)
    assert sel2.loss_weights[3:].tolist() == [0.0, 0.0] and sel2.loss_weights[
        :3
    ].mean() == pytest.approx(1.0)


def test_base_loss_weights_multiply_chosen():
    cfg = EvolvedSamplingConfig()
    ids, losses, prev = batch(16)
    base = torch.arange(16, dtype=torch.float32) + 1
    sel = select_step(
        cfg,
        step=1,
        seed=1,
        ids=ids,
        losses=losses,
        prev_scores=prev,
        valid=None,
        k=6,
        base_loss_weights=base,
    )
    assert torch.equal(sel.loss_weights, base[sel.positions])


def test_methods_through_select_step():
    ids, losses, prev = batch(30)
    kw = dict(step=3, seed=9, ids=ids, losses=losses, prev_scores=prev, valid=None, k=5)
    top = select_step(EvolvedSamplingConfig(method="topk"), **kw)
    w = 0.2 * prev + 0.8 * losses
    assert top.positions.tolist() == sorted(torch.topk(w, 5).indices.tolist())
    uni = select_step(EvolvedSamplingConfig(method="uniform"), **kw)
    assert torch.equal(uni.weights, torch.ones(30))
    es = select_step(EvolvedSamplingConfig(beta1=0.6, beta2=0.6), **kw)
    ema = select_step(EvolvedSamplingConfig(method="ema", beta1=0.6, beta2=0.6), **kw)
    assert torch.equal(es.positions, ema.positions) and torch.equal(es.new_scores, ema.new_scores)


def test_a_few_steps_with_a_table_follow_the_ema():
    cfg = EvolvedSamplingConfig(beta2=0.5)
    t = ScoreTable(10, offset=2**33, s_init=1.0)
    ids = torch.arange(2**33, 2**33 + 10, dtype=torch.int64)
    for step in range(3):
        losses = torch.full((10,), 2.0)
        sel = select_step(
            cfg,
            step=step,
            seed=0,
            ids=ids,
            losses=losses,
            prev_scores=t.gather(ids),
            valid=None,
            k=4,
        )
        t.update(ids, sel.new_scores, None)
    assert torch.allclose(t.gather(ids), torch.full((10,), 2.0 - 0.5**3))


def test_length_mismatch_and_float_ids_rejected():
    cfg = EvolvedSamplingConfig()
    ids, losses, prev = batch(8)
    with pytest.raises(ValueError):
        select_step(
            cfg, step=0, seed=0, ids=ids[:7], losses=losses, prev_scores=prev, valid=None, k=2
        )
    with pytest.raises(TypeError):
        select_step(
            cfg, step=0, seed=0, ids=ids.double(), losses=losses, prev_scores=prev, valid=None, k=2
        )


# --- no host round-trip ---

_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Every Tensor method that reads a value back to the host raises while inside."""

    def boom(name: str):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called")

        return raiser

    saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}
    try:
        for name in _SYNCS:
            setattr(torch.Tensor, name, boom(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_patch_catches_host_reads():
    t = torch.ones(3)
    with no_host_sync():
        for read in (t.sum().item, t.tolist, t.cpu, lambda: bool(t.sum()), lambda: int(t[0])):
            with pytest.raises(AssertionError, match="host sync"):
                read()
    assert t.tolist() == [1.0, 1.0, 1.0]


CONFIGS = [
    EvolvedSamplingConfig(),
    EvolvedSamplingConfig(method="topk", importance_weighting=True),
    EvolvedSamplingConfig(tau=2.0, epsilon=0.3, importance_weighting=True),
    EvolvedSamplingConfig(method="loss", epsilon=1.0),
    EvolvedSamplingConfig(method="uniform"),
    EvolvedSamplingConfig(method="ema", importance_weighting=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-iw{c.importance_weighting}")
@pytest.mark.parametrize("n_valid", [40, 12, 3, 0])  # enough valid, fewer than k, none
def test_select_step_reads_nothing_back_to_the_host(cfg, n_valid):
    ids, losses, prev = batch(40, seed=n_valid, base=2**62)
    valid = torch.arange(40) < n_valid
    losses[5] = float("nan")
    base = torch.linspace(0.5, 2.0, 40)
    kw = dict(step=7, seed=3, ids=ids, losses=losses, prev_scores=prev, valid=valid, k=16)
    want = select_step(cfg, base_loss_weights=base, **kw)
    with no_host_sync():
        got = select_step(cfg, base_loss_weights=base, **kw)
        digest = device_digest(ids[got.positions])
    assert torch.equal(got.positions, want.positions)
    assert torch.equal(got.loss_weights, want.loss_weights)
    assert torch.equal(digest, device_digest(ids[want.positions]))
    assert int(got.num_invalid) == max(0, 16 - n_valid + (n_valid > 5))


def test_select_step_runs_on_the_meta_device():
    dev = torch.device("meta")
    cfg = EvolvedSamplingConfig(epsilon=0.25, importance_weighting=True)
    n = 64
    sel = select_step(
        cfg,
        step=1,
        seed=2,
        ids=torch.arange(n, device=dev),
        losses=torch.empty(n, device=dev),
        prev_scores=torch.empty(n, device=dev),
        valid=torch.empty(n, dtype=torch.bool, device=dev),
        k=16,
        base_loss_weights=torch.empty(n, device=dev),
    )
    for t in (sel.positions, sel.loss_weights, sel.weights, sel.new_scores, sel.num_invalid):
        assert t.device == dev
    assert sel.positions.shape == (16,) and sel.num_invalid.shape == ()
    assert device_digest(sel.positions).device == dev


# --- importance weights equal the host computation they replaced ---


def host_importance_weights(w, ok, positions, *, k, tau, epsilon, deterministic):
    w = w.to(torch.float64)
    n_valid = int(ok.sum())
    out = torch.zeros(positions.numel(), dtype=torch.float32)
    chosen_ok = ok[positions]
    if n_valid == 0 or not bool(chosen_ok.any()):
        return out
    logw = torch.log(torch.where(ok, w, torch.ones_like(w)))
    if not deterministic:
        logw = logw / tau
    logw = torch.where(ok, logw, torch.tensor(float("-inf"), dtype=torch.float64))
    p = torch.softmax(logw, dim=0)
    e = round(epsilon * k) / k if k else 0.0
    p = (1.0 - e) * p + e / n_valid
    inv = 1.0 / p[positions[chosen_ok]]
    out[chosen_ok] = (inv / inv.mean()).to(torch.float32)
    return out


def test_importance_weights_equal_the_host_computation():
    rng = np.random.default_rng(7)
    for case in range(300):
        n = int(rng.integers(1, 50))
        k = int(rng.integers(0, n + 1))
        w = torch.from_numpy(rng.exponential(1.0, n)).float()
        ok = valid_weight_mask(w, torch.from_numpy(rng.random(n) < rng.choice([0.2, 0.8, 1.0])))
        positions = torch.sort(torch.from_numpy(rng.permutation(n)[:k])).values
        kw = dict(
            k=k,
            tau=float(rng.choice([1.0, 2.0])),
            epsilon=float(rng.choice([0.0, 0.3])),
            deterministic=bool(rng.random() < 0.3),
        )
        got = importance_weights(w, ok, positions, **kw)
        want = host_importance_weights(w, ok, positions, **kw)
        if bool(ok[positions].all()):
            assert torch.equal(got, want), case  # same sum over the same values
        else:  # the mean now sums zeros in place of the invalid: last-bit differences only
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


# --- device digest ---

M64 = (1 << 64) - 1


def py_mix64(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def py_device_digest(ids: list[int]) -> int:
    """Pure-Python integers: what every device must compute, whatever its reduction order."""
    from es_llm.sampling.noise import STREAM_DIGEST, derive_key

    key, golden = derive_key(0, STREAM_DIGEST, 0), 0x9E3779B97F4A7C15
    total = 0
    for j, i in enumerate(ids):
        h = py_mix64(key + (i & M64) * golden)
        total += py_mix64(h ^ ((j * golden) & M64))
    return py_mix64(total + len(ids) * golden) & ((1 << 63) - 1)


def test_device_digest_equals_integer_reference_and_is_order_sensitive():
    ids = [0, 1, 2**31, 2**62 + 3, 2**63 - 1, -5, -(2**63), 7, 7]
    d = device_digest(torch.tensor(ids, dtype=torch.int64))
    assert d.dtype == torch.int64 and d.shape == () and int(d) >= 0
    assert int(d) == py_device_digest(ids)
    assert int(device_digest(torch.tensor(ids[::-1]))) == py_device_digest(ids[::-1]) != int(d)
    assert int(device_digest(torch.zeros(0, dtype=torch.int64))) == py_device_digest([])
    big = torch.randint(-(2**63), 2**63 - 1, (5000,), generator=torch.Generator().manual_seed(1))
    assert int(device_digest(big)) == py_device_digest(big.tolist())
    swapped = big.clone()
    swapped[[10, 20]] = big[[20, 10]]
    assert int(device_digest(swapped)) != int(device_digest(big))
    assert int(device_digest(big[:-1])) != int(device_digest(big))
    with pytest.raises(TypeError):
        device_digest(torch.tensor([1.0]))


# --- schedule ---


def test_burn_in_resolution():
    assert resolve_burn_in_steps(EvolvedSamplingConfig(), 1000, 100) == 10
    assert resolve_burn_in_steps(EvolvedSamplingConfig(), 150, 10) == 2  # ceil(1.5)
    assert resolve_burn_in_steps(EvolvedSamplingConfig(burn_in_steps=7), 1000, 100) == 7
    assert resolve_burn_in_steps(EvolvedSamplingConfig(burn_in_epochs=2), 1000, 100) == 200
    assert resolve_burn_in_steps(EvolvedSamplingConfig(burn_in_steps=5000), 1000, 100) == 1000
    assert resolve_burn_in_steps(EvolvedSamplingConfig(burn_in_steps=0), 1000, 100) == 0


def test_phases():
    cfg = EvolvedSamplingConfig(burn_in_steps=10, anneal_fraction=0.1)
    assert anneal_start_step(cfg, 100) == 90
    phases = [phase_for_step(s, 100, cfg, 25) for s in range(100)]
    assert phases[:10] == [Phase.BURN_IN] * 10
    assert phases[10:90] == [Phase.SELECT] * 80
    assert phases[90:] == [Phase.ANNEAL] * 10
    no_anneal = EvolvedSamplingConfig()
    assert anneal_start_step(no_anneal, 100) == 100
    assert phase_for_step(99, 100, no_anneal, 25) is Phase.SELECT
    assert phase_for_step(0, 100, no_anneal, 25) is Phase.BURN_IN
