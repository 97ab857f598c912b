import json
import math
import time

import pytest
import torch

from delsketch.tasks import PRESETS, get_preset, preset_overrides
from delsketch.training import retrain, train

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------- registry


def test_registry():
    assert set(PRESETS) == {"paper", "names", "digits"}
    with pytest.raises(ValueError, match=r"unknown preset 'x' \(choose from: paper, names, digits\)"):
        get_preset("x")
    with pytest.raises(ValueError, match="no override"):
        get_preset("names")(bogus=1)
    assert preset_overrides("names")["n"] == 300
    assert preset_overrides("digits")["batch"] == 32


# ---------------------------------------------------------------------------------- paper


def test_paper_needs_data():
    with pytest.raises(ValueError, match="names.txt"):
        get_preset("paper")()
    with pytest.raises(ValueError, match="does not exist"):
        get_preset("paper")("/nonexistent/names.txt")


@pytest.fixture(scope="module")
def paper(single_thread, names_txt):
    return get_preset("paper")(str(names_txt))


@pytest.fixture(scope="module")
def anchor(reference_dir):
    return json.loads((reference_dir / "fig2_anchor.json").read_text())


def test_paper_init_equals_reference(paper, reference_dir):
    from delsketch.tasks.paper import PARAM_ORDER, flat_params

    ref = json.loads((reference_dir / "init_params.json").read_text())
    init = paper.init_params()
    assert list(init) == PARAM_ORDER
    assert PARAM_ORDER[:3] == ["wte", "wpe", "lm_head"]
    assert sum(p.numel() for p in init.values()) == 4192
    assert all(p.dtype == torch.float64 for p in init.values())
    assert flat_params(init) == ref  # exact


def test_paper_task_shape(paper):
    assert paper.n == 1000 and len(paper.schedule) == 1000
    assert paper.schedule[:3] == [[0], [1], [2]]
    assert paper.config["chars"] == "abcdefghijklmnopqrstuvwxyz"
    d = paper.optimizer.describe()
    assert d["betas"] == [0.85, 0.99] and d["eps"] == 1e-3 and d["eps_inside_sqrt"] is True
    assert d["schedule"] == {"name": "linear_decay", "total_steps": 1000}
    assert paper.config["data_sha256"].startswith("0a30b555") and paper.config["data_sha256"].endswith("8cc4d")


def test_paper_select_matches_anchor(paper, anchor):
    D = paper.select("contains:x")
    assert [i for i in D if i < 1000] == anchor["deletions"]
    assert all("x" in paper.examples[i] for i in D)


@pytest.fixture(scope="module")
def paper_runs(single_thread, paper, anchor):
    t0 = time.perf_counter()
    plain = train(paper)
    elapsed = time.perf_counter() - t0
    print(f"\npaper preset: 1000 plain float64 steps in {elapsed:.2f} s")
    D = anchor["deletions"]
    return {0.0: plain, 0.5: retrain(paper, D, weight=0.5), 1.0: retrain(paper, D, weight=1.0)}, elapsed


@pytest.mark.parametrize("doc", ["max", "emma"])
def test_paper_retrained_losses_match_reference(paper, anchor, paper_runs, doc):
    runs, _ = paper_runs
    for t, params in runs.items():
        got = paper.query(params, doc).item()
        want = anchor["tests"][doc]["retrained_loss"][str(t)]
        assert math.isclose(got, want, rel_tol=1e-8), (doc, t, got, want)
    # the degree-0 Taylor coefficient is the plain run's loss
    c0 = anchor["tests"][doc]["taylor_coefficients_real"][0]
    assert math.isclose(paper.query(runs[0.0], doc).item(), c0, rel_tol=1e-12)


def test_paper_plain_run_is_fast(paper_runs):
    _, elapsed = paper_runs
    assert elapsed < 60, f"1000 plain steps took {elapsed:.1f} s"


def test_paper_query_validation(paper):
    paper.validate_query("max")
    with pytest.raises(ValueError):
        paper.validate_query("Max")
    with pytest.raises(ValueError):
        paper.validate_query("")
    with pytest.raises(ValueError):
        paper.query(paper.init_params(), "ma x")
    with pytest.raises(ValueError):
        paper.select("has:x")
    with pytest.raises(ValueError):
        paper.select("contains:")


def test_paper_long_query_truncated(paper):
    p = paper.init_params()
    long = "abcdefghijklmnopqrstuvwxyz"
    # a text of 16 or more characters predicts the same 16 targets (its first 16 characters)
    assert paper.query(p, long[:20]).item() == paper.query(p, long[:16]).item()
    assert paper.query(p, long[:15]).item() != paper.query(p, long[:16]).item()


# ---------------------------------------------------------------------------------- names


@pytest.fixture(scope="module")
def names_task():
    return get_preset("names")()


def test_names_defaults(names_task):
    t = names_task
    assert t.n == 300 and len(t.schedule) == 300 and len(t.examples) == 300
    assert t.config["data_docs"] == 5163
    assert all(e.isalpha() and e.islower() for e in t.examples)
    assert len(set(t.examples)) == 300
    assert sum(p.numel() for p in t.init_params().values()) == 4192
    assert t.optimizer.describe()["eps_inside_sqrt"] is True
    assert len(t.default_queries) == 3 and not set(t.default_queries) & set(t.examples)
    assert "shared" not in json.dumps(t.config)


def test_names_overrides_and_determinism():
    build = get_preset("names")
    t1 = build(n=20, steps=30)
    t2 = build(n=20, steps=30)
    assert t1.n == 20 and len(t1.schedule) == 30 and t1.schedule[25] == [5]
    assert t1.fingerprint() == t2.fingerprint()
    assert t1.fingerprint() != build(n=20, steps=30, seed=1).fingerprint()
    D = t1.select("contains:a")
    assert D and all("a" in t1.examples[i] for i in D)
    p1 = retrain(t1, D, 0.5)
    p2 = retrain(t2, D, 0.5)
    for k in p1:
        assert torch.equal(p1[k], p2[k])
    q = t1.default_queries[0]
    v1, v2 = t1.query(p1, q), t2.query(p2, q)
    assert v1.dim() == 0 and torch.equal(v1, v2)
    assert t1.query(p1, q).item() != t1.query(t1.init_params(), q).item()
    with pytest.raises(ValueError):
        t1.validate_query("o'neil")
    with pytest.raises(ValueError):
        t1.select("nope:a")
    with pytest.raises(ValueError, match="no data file"):
        build("/tmp/names.txt")


def test_names_predicates(names_task):
    t = names_task
    for pred, f in [
        ("contains:x", lambda d: "x" in d),
        ("startswith:ma", lambda d: d.startswith("ma")),
        ("endswith:a", lambda d: d.endswith("a")),
    ]:
        assert t.select(pred) == [i for i, d in enumerate(t.examples) if f(d)]
    assert t.select(f"equals:{t.examples[7]}") == [7]


# ---------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_task():
    return get_preset("digits")()


def test_digits_defaults(digits_task):
    t = digits_task
    assert t.n == 500 and len(t.examples) == 500
    assert len(t.schedule) == 48
    assert [len(b) for b in t.schedule[:16]] == [32] * 15 + [20]
    assert sorted(sum(t.schedule[:16], [])) == list(range(500))
    assert sorted(sum(t.schedule[16:32], [])) == list(range(500))
    assert t.schedule[:16] != t.schedule[16:32]
    shapes = {k: tuple(v.shape) for k, v in t.init_params().items()}
    assert shapes == {"fc1.weight": (32, 64), "fc1.bias": (32,), "fc2.weight": (10, 32), "fc2.bias": (10,)}
    assert len(t.config["split"]["test_source_indices"]) == 100
    assert not set(t.config["split"]["test_source_indices"]) & {e["source_index"] for e in t.examples}


def test_digits_training_queries_predicates(digits_task):
    t = digits_task
    p0 = t.init_params()
    p = train(t)
    p_again = train(t)
    for k in p:
        assert torch.equal(p[k], p_again[k])
    assert t.query(p, "test:mean").item() < 0.6 * t.query(p0, "test:mean").item()
    for q in ("test:17", "train:3", "test:0", "test:99", "train:499"):
        t.validate_query(q)
        v = t.query(p, q)
        assert v.dim() == 0 and v.item() > 0
    for bad in ("test:100", "train:500", "test:-1", "test:x", "valid:3", "17"):
        with pytest.raises(ValueError):
            t.validate_query(bad)
    c3 = t.select("class:3")
    assert c3 and all(t.examples[i]["label"] == 3 for i in c3)
    assert sum(len(t.select(f"class:{c}")) for c in range(10)) == 500
    for bad in ("class:10", "class:x", "label:3", "class"):
        with pytest.raises(ValueError):
            t.select(bad)


def test_digits_variants():
    build = get_preset("digits")
    full = build(batch=None, steps=5)
    assert len(full.schedule) == 5 and all(b == list(range(500)) for b in full.schedule)
    adam = build(optimizer="adam", steps=3, activation="gelu")
    assert adam.optimizer.describe()["eps_inside_sqrt"] is True
    p = train(adam)
    assert torch.isfinite(adam.query(p, "test:mean"))
    assert len(build(steps=40).schedule) == 40
    assert build().fingerprint() == build().fingerprint() != build(seed=1).fingerprint()
    with pytest.raises(ValueError):
        build(optimizer="lbfgs")
    with pytest.raises(ValueError):
        build(activation="relu")
    with pytest.raises(ValueError):
        build("some/file")


def test_build_from_spec_rebuilds_the_task():
    """A task spec (as sketches record it, and as worker processes rebuild tasks from it) gives the same task:
    top-level overrides go to the builder, ``preset_steps`` is the builder's run length, ``steps`` cuts the
    schedule like the CLI's --steps; a changed override gives another fingerprint."""
    from delsketch.tasks import build_from_spec
    from delsketch.training import first_steps

    want = first_steps(get_preset("digits")(steps=30, batch=None, n_train=100), 5)
    spec = {"preset": "digits", "data": None, "steps": 5, "preset_steps": 30, "batch": None, "n_train": 100}
    got = build_from_spec(spec)
    assert got.fingerprint() == want.fingerprint() and len(got.schedule) == 5
    assert build_from_spec({**spec, "n_train": 90}).fingerprint() != want.fingerprint()
    assert spec["preset"] == "digits" and "preset_steps" in spec  # the caller's dict is left alone


def test_fingerprint_parts_ignore_the_modules_unused_initial_values():
    """A preset passes its parameters explicitly; the values torch's global generator gave its nn.Module are never
    used and must not enter the fingerprint (they did: a resumed sketch's manifest differed from a clean one)."""
    torch.manual_seed(1)
    a = get_preset("digits")(n_train=50, epochs=1)
    torch.manual_seed(2)
    b = get_preset("digits")(n_train=50, epochs=1)
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.fingerprints() == b.fingerprints() and a.fingerprint() == b.fingerprint()
