"""The method registry (backfill/registry.py) without training: registrations, groups, query sides,
ablation components, recipes from the profile, the generic system builder."""
import dataclasses

import numpy as np
import pytest
import torch

from backfill_utils import config as C
from backfill_utils.backfill import experiments as X
from backfill_utils.backfill import orders, systems as BS
from backfill_utils.backfill import registry as MM
from backfill_utils.compat import modules as K
from backfill_utils.compat.recipes import CMCLPsiRhoRecipe, FastFillRecipe, FCTRecipe, RevPsiRecipe

PAPER = ["old", "new", "offline", "naive", "BCT", "FCT", "FastFill", "FCT-small", "FastFill-small", "BiCT", "RM", "RM+psi", "RM+psi+CMCL",
         "CMCL-single", "CMCL-separate", "CMCL w/o L_rev", "Ours"]


def test_the_papers_methods_and_groups():
    assert MM.names() == PAPER
    assert MM.names("main") == ["old", "new", "offline", "naive", "BCT", "FCT", "FastFill", "FCT-small",
                                "FastFill-small", "BiCT", "RM", "RM+psi", "RM+psi+CMCL", "Ours"]
    assert MM.names("ablation") == ["RM", "RM+psi", "RM+psi+CMCL", "CMCL w/o L_rev", "Ours"]
    assert MM.names("cmcl_variants") == ["RM+psi", "RM+psi+CMCL", "CMCL-single", "CMCL-separate", "Ours"]
    assert MM.names("serving") == ["offline", "FCT", "RM", "Ours"]
    for g in MM.GROUPS:
        assert MM.names(g), f"group {g} is empty"
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        MM.names("nope")
    with pytest.raises(KeyError, match="unknown method 'nope'; registered"):
        MM.get("nope")
    # every style is a matplotlib line style, distinct colour + line style per main method
    styles = [(MM.style(n)["color"], MM.style(n)["ls"]) for n in MM.names("main")]
    assert len(set(styles)) == len(styles)


def _lab(hex_color):
    """CIELAB (D65) of an sRGB colour."""
    from matplotlib.colors import to_rgb

    c = np.asarray(to_rgb(hex_color))
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    f = np.cbrt(xyz / np.array([0.95047, 1.0, 1.08883]))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_colour_map_gives_every_registered_method_its_own_colour():
    import itertools

    names = MM.names()
    assert set(MM.COLORS) == set(names)  # one place: every method of the package has its entry
    colors = {n: MM.style(n)["color"] for n in names}
    assert colors == {n: MM.color(n) for n in names} == {n: MM.COLORS[n] for n in names}
    # distinct to the eye, not only as strings: CIELAB Delta E 76 of at least 20 for every pair
    close = [(a, b) for a, b in itertools.combinations(names, 2)
             if np.linalg.norm(_lab(colors[a]) - _lab(colors[b])) < 20]
    assert not close, close
    assert not set(MM.SPARE_COLORS) & set(MM.COLORS.values())
    # a method registered without a colour gets a spare one; with its own colour, that colour
    MM.register(MM.Method("tmp-a", dict(ls="-"), "no colour", ("flips",)))
    MM.register(MM.Method("tmp-b", dict(color="#123456"), "own colour", ("flips",)))
    try:
        assert MM.color("tmp-a") == MM.SPARE_COLORS[0] and MM.style("tmp-b")["color"] == "#123456"
        assert MM.color("nope") is None and MM.style("nope") == {}
    finally:
        MM.unregister("tmp-a"), MM.unregister("tmp-b")


def test_query_side_passes_and_slots():
    assert MM.query_side("RM") == [("old", []), ("new", [])]
    assert MM.query_side("Ours") == [("new", ["psi", "rho"])]
    assert MM.query_side("RM+psi") == [("new", ["psi"])]
    assert MM.query_side("FCT") == [("new", [])] and MM.query_side("BCT") == [("bct", [])]
    assert MM.query_side("BiCT") == [("bct", [])] and MM.get("BiCT").slots == ("h",)
    for n in MM.names():
        m = MM.get(n)
        assert len(MM.query_side(n)) == m.query_passes == (2 if n == "RM" else 1)
    assert [n for n in MM.names() if MM.get(n).order is not None] == ["FastFill", "FastFill-small"]


def test_ablation_components_follow_the_recipes():
    cfg = C.load_profile("smoke")
    marks = {n: MM.components(n, cfg) for n in MM.names("ablation")}
    assert marks["RM"] == dict(psi=False, CMCL=False, L_rev=False, rho=False)
    assert marks["RM+psi"] == dict(psi=True, CMCL=False, L_rev=True, rho=False)
    assert marks["CMCL w/o L_rev"] == dict(psi=True, CMCL=True, L_rev=False, rho=False)
    assert marks["Ours"] == dict(psi=True, CMCL=True, L_rev=True, rho=True)
    # the profile's lambda_rev reaches the components through the recipe
    no_rev = C.load_profile("smoke", overrides={"compat": {"lambda_rev": 0.0}})
    assert MM.components("Ours", no_rev)["L_rev"] is False
    with pytest.raises(ValueError, match="not an ablation row"):
        MM.components("FCT", cfg)


def test_recipes_come_from_the_profile():
    cfg = C.load_profile("smoke", overrides={"compat": {"epochs": 7, "tau": 0.2, "fastfill_mu": 0.5,
                                                        "bict_ce_weight": 0.0, "fastfill_epochs": 9}})
    ours = MM.get("Ours").default_recipe(cfg)
    assert ours == CMCLPsiRhoRecipe(epochs=7, batch_size=64, lr=1e-3, tau=0.2, seed=0)
    assert MM.get("CMCL w/o L_rev").default_recipe(cfg).lambda_rev == 0.0  # fixed by the method
    assert MM.get("RM+psi").default_recipe(cfg) == RevPsiRecipe(epochs=7, batch_size=64, lr=1e-3)
    # FCT and FastFill: their authors' recipe, changed only by their own keys (the profile's
    # fastfill_*); their small-h variants run on the shared schedule
    smoke = cfg["compat"]
    assert MM.get("FastFill").default_recipe(cfg) == FastFillRecipe(
        epochs=9, mu=0.5, batch_size=smoke["fastfill_batch_size"], hidden=smoke["fastfill_hidden"],
        warmup_epochs=smoke["fastfill_warmup_epochs"], regression="sum")
    # its regression at the authors' balance: their mean over dimensions on unnormalised embeddings
    raw = C.load_profile("smoke", overrides={"normalize_embeddings": False})
    assert MM.get("FastFill").default_recipe(raw).regression == "mean"
    assert MM.get("FCT").default_recipe(cfg).regression == MM.get("FCT").default_recipe(raw).regression == "mean"
    assert MM.get("FCT").default_recipe(C.load_profile("paper")) == FCTRecipe()
    small = MM.get("FastFill-small").default_recipe(cfg)
    assert (small.epochs, small.batch_size, small.mu, small.arch, small.regression) == (7, 64, 0.5, "mlp", "sum")
    assert MM.get("BiCT").default_recipe(cfg).ce_weight == 0.0
    assert MM.get("RM").default_recipe(cfg) is None
    # a recipe and a seed given by the caller (a tuner, a seed study)
    r, seed = X.resolve_recipe(cfg, "Ours", seed=3)
    assert seed == 3 and r == ours.replace(seed=3)
    r, seed = X.resolve_recipe(cfg, "Ours", CMCLPsiRhoRecipe(tau=0.05, seed=4))
    assert seed == 4 and r.tau == 0.05
    r, seed = X.resolve_recipe(cfg, "Ours", CMCLPsiRhoRecipe(tau=0.05, seed=4), seed=1)
    assert seed == 1 and r.seed == 1


def test_registration_errors_and_replacement():
    fit = lambda data, recipe: MM.Trained()  # noqa: E731
    bad = [
        (dict(groups=("nope",)), "unknown group"),
        (dict(backbone="bigger"), "backbone must be one of"),
        (dict(slots=("psi",)), "need a fit function"),
        (dict(slots=("phi",), fit=fit, train_roles=("new",)), "slots must be among"),
        (dict(fit=fit), "train_roles"),
        (dict(two_pass=True, slots=("psi",), fit=fit, train_roles=("new",)), "no psi or h"),
        (dict(reference="old", two_pass=True), "reference curve has no"),
        (dict(order=lambda t, o: o), "order_name"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            MM.Method("x", {}, "x", **kw)
    with pytest.raises(ValueError, match="without ' \\('"):
        MM.Method("x (y)", {}, "variant names are reserved")
    with pytest.raises(ValueError, match="already registered"):
        MM.register(MM.Method("RM", {}, "again"))
    with pytest.raises(TypeError, match="methods.Method"):
        MM.register({"name": "x"})
    m = MM.register(MM.Method("tmp", dict(color="k"), "a test method", ("flips",)))
    try:
        assert MM.names()[-1] == "tmp" and "tmp" in MM.names("flips")
        MM.register(MM.Method("tmp", dict(color="r"), "again", ("flips",)), replace=True)
        assert MM.style("tmp") == {"color": "r"} and MM.names().count("tmp") == 1
    finally:
        assert MM.unregister("tmp").name == m.name
    assert "tmp" not in MM.names()


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _same(a: BS.BackfillSystem, b: BS.BackfillSystem) -> None:
    for f in ("query_old", "gallery_old", "query_new", "gallery_new"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert np.array_equal(a.resolved_order(), b.resolved_order()) and a.query_passes == b.query_passes


def test_generic_system_is_each_methods_system():
    """make_system builds, from the slots, exactly the systems of backfill/systems.py's table."""
    rng = np.random.default_rng(0)
    n, d = 40, 6
    old, new, bct = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, d)
    torch.manual_seed(0)
    psi, rho = K.ReverseTransform(d, d).eval(), K.LearnableEmbedding(d).eval()
    h, ff = K.ForwardTransform(d, d).eval(), K.FastFillTransform(d, d).eval()
    order = orders.random_order(n, 1)
    mk = lambda name, old_, new_, **t: X.make_system(MM.get(name), old_, new_, MM.Trained(**t), order)  # noqa: E731
    _same(mk("naive", old, new), BS.BackfillSystem.mixed("naive", new, old, new, order=order))
    _same(mk("BCT", old, bct), BS.BackfillSystem.mixed("BCT", bct, old, bct, order=order))
    _same(mk("RM", old, new), BS.BackfillSystem.merge("RM", old, old, new, new, order=order, query_passes=2))
    _same(mk("RM+psi", old, new, psi=psi),
          BS.BackfillSystem.merge("RM+psi", K.apply(psi, new), old, new, new, order=order))
    _same(mk("Ours", old, new, psi=psi, rho=rho),
          BS.BackfillSystem.merge("Ours", K.apply(psi, new), old, K.apply(rho, new), K.apply(rho, new), order=order))
    _same(mk("FCT", old, new, h=h), BS.BackfillSystem.mixed("FCT", new, K.apply(h, old), new, order=order))
    _same(mk("BiCT", old, bct, h=h), BS.BackfillSystem.mixed("BiCT", bct, K.apply(h, old), bct, order=order))
    ff_order = orders.method_order(MM.get("FastFill"), MM.Trained(h=ff), old, 1)
    ff_system = X.make_system(MM.get("FastFill"), old, new, MM.Trained(h=ff), ff_order)
    _same(ff_system, BS.BackfillSystem.mixed("FastFill", new, K.apply(ff, old), new,
                                            order=K.fastfill_order(ff, old)))
    assert not np.array_equal(ff_system.order, order)  # FastFill's own order, not the random one


def test_a_methods_order_is_its_own_else_the_seeded_random_one():
    """method_order: FastFill's sigma order from its trained h; every method without an order
    gets random_order(n, seed); a method's order that is not a permutation is an error."""
    rng = np.random.default_rng(0)
    n, d = 30, 6
    old = _unit(rng, n, d)
    torch.manual_seed(0)
    ff = K.FastFillTransform(d, d).eval()
    got = orders.method_order(MM.get("FastFill"), MM.Trained(h=ff), old, 5)
    assert got.dtype == np.int64 and np.array_equal(got, K.fastfill_order(ff, old))
    for name in ("RM", "Ours", "FCT", "offline"):
        assert np.array_equal(orders.method_order(MM.get(name), MM.Trained(), old, 5), orders.random_order(n, 5)), name
    assert not np.array_equal(orders.method_order(MM.get("RM"), None, old, 6), orders.random_order(n, 5))
    bad = dataclasses.replace(MM.get("FastFill"), order=lambda trained, g: np.zeros(len(g), dtype=int))
    with pytest.raises(ValueError, match="backfill order of 'FastFill' is not a permutation"):
        orders.method_order(bad, MM.Trained(h=ff), old, 5)
