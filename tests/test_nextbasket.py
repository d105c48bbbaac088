"""The next-basket benchmark's protocol, references and metrics, on toy data worked out by
hand (never the demo)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import features
from bench import nextbasket as nb
from features import catalog as nb_catalog
from policy.rules import DEFAULT_RULES, load_rules

T0 = pd.Timestamp("2024-01-01")


def _lines(spec: dict[str, list[tuple[int, list[str]]]]) -> pd.DataFrame:
    """Order lines: per customer, (day, items) baskets; basket ids '<customer>-<day>'."""
    rows = [
        {
            "basket_id": f"{customer}-{day:03d}",
            "customer_id": customer,
            "time": T0 + pd.Timedelta(days=day, minutes=line),
            "item_id": item,
            "category": "FOOD",
            "quantity": 1,
            "amount": 1.5,
        }
        for customer, baskets in spec.items()
        for day, items in baskets
        for line, item in enumerate(items)
    ]
    return pd.DataFrame(rows)


def _split(
    histories: dict[str, list[list[str]]],
    targets: dict[str, list[str]],
    test: list[str],
    categories: dict[str, str] | None = None,
) -> nb.Split:
    """A split given directly: history baskets oldest first, then the target; every item
    in category FOOD but those given."""
    rows = []
    for customer, baskets in histories.items():
        for position, items in enumerate([*baskets, targets[customer]]):
            for item in items:
                rows.append(
                    {
                        "customer_id": customer,
                        "basket_id": f"{customer}-{position}",
                        "time": T0 + pd.Timedelta(days=position),
                        "item_id": item,
                        "position": position,
                        "target": position == len(baskets),
                    }
                )
    pairs = pd.DataFrame(rows)
    category = [(categories or {}).get(item, "FOOD") for item in pairs["item_id"]]
    lines = pairs.assign(category=category, quantity=1, amount=1.0)
    return nb.Split(pairs=pairs, lines=lines, test=np.array(sorted(test), dtype=object))


# -- the protocol ------------------------------------------------------------------------------
PROTOCOL = {
    # kept: the target loses r (never in a history); s is in 2 history baskets only
    "a": [(1, ["m", "n", "s"]), (2, ["m", "s"]), (3, ["m", "r"])],
    # 2 baskets: dropped before the counts, so its s does not count
    "b": [(1, ["s"]), (2, ["m"])],
    # baskets ordered by time, not by the order given; its target's s is never counted
    "c": [(1, ["m", "n"]), (5, ["n"]), (3, ["m"]), (6, ["m", "n", "s"])],
    # its first basket holds only u (1 history basket): it vanishes, 3 baskets remain
    "d": [(1, ["u"]), (2, ["m"]), (3, ["n"]), (4, ["m"])],
    # likewise, but then only 2 baskets remain: dropped
    "e": [(1, ["v"]), (2, ["m"]), (3, ["n"])],
    # its target holds only r2 (in no history): dropped
    "f": [(1, ["m"]), (2, ["n"]), (3, ["r2"])],
}
# history baskets holding each item (a, c, d, e, f): m 7, n 5, s 2, u 1, v 1, r 0, r2 0


def test_the_protocol_keeps_customers_baskets_and_items_as_documented() -> None:
    split = nb.make_split(_lines(PROTOCOL))
    assert split.customers.tolist() == ["a", "c", "d"]
    assert sorted(split.pairs["item_id"].unique()) == ["m", "n"]
    targets = split.pairs[split.pairs["target"]]
    assert {c: set(g) for c, g in targets.groupby("customer_id")["item_id"]} == {
        "a": {"m"},
        "c": {"m", "n"},
        "d": {"m"},
    }
    # targets are the last baskets by time; positions count the history, oldest first
    assert dict(zip(targets["customer_id"], targets["basket_id"], strict=True)) == {
        "a": "a-003",
        "c": "c-006",
        "d": "d-004",
    }
    history = split.history.drop_duplicates("basket_id").set_index("basket_id")["position"]
    assert history.to_dict() == {
        "a-001": 0,
        "a-002": 1,
        "c-001": 0,
        "c-003": 1,
        "c-005": 2,
        "d-002": 0,
        "d-003": 1,
    }
    assert set(targets.groupby("customer_id")["position"].first().items()) == {
        ("a", 2),
        ("c", 3),
        ("d", 2),
    }
    assert split.baskets(["c"]) == {"c": [["m", "n"], ["m"], ["n"]]}
    # the lines kept are those of the kept baskets and items only
    assert sorted(split.lines["basket_id"] + ":" + split.lines["item_id"]) == sorted(
        split.pairs["basket_id"] + ":" + split.pairs["item_id"]
    )


def test_a_long_history_keeps_its_last_50_baskets_before_the_counts() -> None:
    # 53 baskets of m; 'old' in the first three (cut) and at day 10: 1 basket, dropped
    spec = {"g": [(day, ["m", "old"] if day in (1, 2, 3, 10) else ["m"]) for day in range(1, 54)]}
    split = nb.make_split(_lines(spec))
    assert split.pairs["basket_id"].nunique() == 50
    assert split.pairs["time"].min() == T0 + pd.Timedelta(days=4)
    assert split.pairs.loc[split.pairs["target"], "basket_id"].tolist() == ["g-053"]
    assert set(split.pairs["item_id"]) == {"m"}
    assert split.history["position"].max() == 48


def test_a_fifth_of_the_customers_are_the_test_customers_drawn_with_the_seed() -> None:
    customers = [f"k{i}" for i in range(10)]
    spec = {c: [(1, ["m"]), (2, ["m"]), (3, ["m"])] for c in customers}
    split = nb.make_split(_lines(spec))
    assert len(split.test) == 2 and set(split.test) <= set(customers)
    drawn = np.random.default_rng(nb.SEED).choice(np.array(customers), size=2, replace=False)
    assert split.test.tolist() == sorted(drawn)
    assert nb.make_split(_lines(spec)).test.tolist() == split.test.tolist()
    others = {tuple(nb.make_split(_lines(spec), seed=s).test) for s in range(1, 6)}
    assert len(others) > 1  # the seed decides


def test_the_kept_folder_hides_the_test_targets_and_reads_back_the_same_split(
    tmp_path: Path,
) -> None:
    split = nb.make_split(_lines(PROTOCOL), test_share=0.34)  # one of the three customers
    (customer,) = split.test
    paths = nb.write_folder(split, tmp_path)
    seen = pd.read_csv(paths[nb.LINES_FILE], dtype=str)
    assert list(seen.columns) == ["receipt", "shopper", "when", "sku", "category", "units", "paid"]
    hidden = split.pairs.loc[split.pairs["target"] & (split.pairs["customer_id"] == customer)]
    assert not set(hidden["basket_id"]) & set(seen["receipt"])
    others = split.pairs.loc[split.pairs["target"] & (split.pairs["customer_id"] != customer)]
    assert set(others["basket_id"]) <= set(seen["receipt"])
    test = pd.read_csv(paths[nb.TEST_FILE], dtype=str)
    assert test.to_dict("records") == [
        {"customer_id": customer, "as_of": hidden["time"].iloc[0].isoformat()}
    ]
    again = nb.read_folder(tmp_path)
    assert again.test.tolist() == split.test.tolist()
    assert again.targets() == split.targets()
    assert again.baskets(split.customers) == split.baskets(split.customers)
    assert nb.global_top(again) == nb.global_top(split)


# -- the references -------------------------------------------------------------------------------
# history baskets holding each item: y 5, w 2, x 2, v 1, z 1
TOPFREQ = {
    "t1": [["x", "y"], ["x"], ["z"]],
    "n1": [["y"], ["y"], ["y", "w"]],
    "n2": [["w"], ["v"], ["y"]],
}


def test_topfreq_references() -> None:
    split = _split(TOPFREQ, {"t1": ["q"], "n1": ["y"], "n2": ["w"]}, ["t1"])
    assert nb.global_top(split) == ["y", "w", "x", "v", "z"]  # ties by item id
    lists = nb.topfreq_references(split, k=4)
    assert lists["G-TopFreq"] == {"t1": ["y", "w", "x", "v"]}
    # x in 2 baskets; z and y in 1 each, z the more recent
    assert lists["P-TopFreq"] == {"t1": ["x", "z", "y"]}  # no padding
    assert lists["GP-TopFreq"] == {"t1": ["x", "z", "y", "w"]}
    assert lists["G-TopFreq-new"] == {"t1": ["w", "v"]}  # only two items are new to t1
    assert nb.topfreq_references(split, k=2)["P-TopFreq"] == {"t1": ["x", "z"]}
    assert nb.personal_top([["b", "a"], ["c"]]) == ["c", "a", "b"]


def _vector(baskets: list[list[int]], n_items: int = 3) -> np.ndarray:
    entries = [(position, item) for position, items in enumerate(baskets) for item in items]
    position, item = np.array(entries).T
    matrix = nb.tifu_vectors(
        np.zeros(len(entries), dtype=int),
        position,
        item,
        (1, n_items),
        within_decay_rate=0.9,
        group_decay_rate=0.6,
        group_count=3,
    )
    return matrix.toarray()[0]


def test_tifu_user_vectors_by_hand() -> None:
    a, b, c = 0, 1, 2
    # 4 baskets in 3 groups: [0], [1], [2, 3]; within decays .729 .81 .9 1; groups .36 .6 1
    # a = (.729 × .36 + .81 × .6) / 3, b = (.81 × .6 + (.9 / 2) × 1) / 3, c = (1 / 2) / 3
    assert _vector([[a], [a, b], [b], [c]]) == pytest.approx([0.24948, 0.312, 0.1666667])
    # 5 baskets: [0], [1, 2], [3, 4] (the later groups the larger); decays .6561 .729 .81 .9 1
    # a = (.6561 × .36 + .9 / 2) / 3, b = (.729 / 2 × .6 + 1 / 2) / 3, c = (.81 / 2 × .6) / 3
    assert _vector([[a], [b], [c], [a], [b]]) == pytest.approx([0.228732, 0.2395667, 0.081])
    # 3 baskets, one per group: a = .81 × .36 / 3, b = .9 × .6 / 3, c = 1 / 3
    assert _vector([[a], [b], [c]]) == pytest.approx([0.0972, 0.18, 0.3333333])
    # 6 baskets: [0, 1], [2, 3], [4, 5]; a = (.59049 + .6561) / 2 × .36 / 3, b = (.729 + .81)
    # / 2 × .6 / 3, c = (.9 + 1) / 2 / 3
    assert _vector([[a], [a], [b], [b], [c], [c]]) == pytest.approx([0.0747954, 0.1539, 0.3166667])
    # fewer baskets than groups: each its own group, weighted .6^(3-1-g), over 2 groups
    assert _vector([[a], [b]]) == pytest.approx([0.162, 0.3, 0.0])


def test_tifu_knn_blends_the_own_vector_with_the_nearest_neighbours() -> None:
    # vectors: t {a: .462}, n1 {a: .462, b: .3}, n2 {c: .462}; n1 is t's nearest
    split = _split(
        {"t": [["a"], ["a"]], "n1": [["a"], ["a", "b"]], "n2": [["c"], ["c"]]},
        {"t": ["b"], "n1": ["a"], "n2": ["c"]},
        ["t"],
    )
    # one neighbour: .2 × {a: .462} + .8 × {a: .462, b: .3} = {a: .462, b: .24}
    assert nb.tifu_knn(split, num_nearest_neighbors=1) == {"t": ["a", "b"]}
    # both: .2 × {a: .462} + .8 × {a: .231, b: .15, c: .231} = {a: .2772, c: .1848, b: .12}
    assert nb.tifu_knn(split, num_nearest_neighbors=2) == {"t": ["a", "c", "b"]}
    assert nb.tifu_knn(split, k=1, num_nearest_neighbors=2) == {"t": ["a"]}


# -- the metrics ---------------------------------------------------------------------------------
def test_metrics_by_hand_with_the_repeat_and_new_split() -> None:
    got = nb.customer_metrics(["a", "b", "c", "d"], {"b", "d", "e"}, {"b", "x"}, ks=(2, 4))
    one, two, four = 1.0, 1 / math.log2(3), 1 / math.log2(5)  # gains at ranks 1, 2 and 4
    expected = {
        # top 2 [a, b]: b hits at rank 2; the ideal over min(3, 2) = 2 items
        "recall@2": 1 / 3,
        "ndcg@2": 0.3868528,  # .6309 / (1 + .6309)
        "phr@2": 1.0,
        "recall_repeat@2": 1.0,  # repeat part {b}
        "ndcg_repeat@2": 0.6309298,  # ideal over 1 item: 1
        "phr_repeat@2": 1.0,
        "recall_new@2": 0.0,  # new part {d, e}
        "ndcg_new@2": 0.0,
        "phr_new@2": 0.0,
        # top 4: b (rank 2) and d (rank 4); ideal over 3 items
        "recall@4": 2 / 3,
        "ndcg@4": 0.4981893,  # (.6309 + .4307) / (1 + .6309 + .5)
        "phr@4": 1.0,
        "recall_repeat@4": 1.0,
        "ndcg_repeat@4": 0.6309298,
        "phr_repeat@4": 1.0,
        "recall_new@4": 0.5,
        "ndcg_new@4": 0.2640681,  # .4307 / (1 + .6309)
        "phr_new@4": 1.0,
    }
    assert got == pytest.approx(expected, abs=1e-6)
    assert got["ndcg@4"] == pytest.approx((two + four) / (one + two + 0.5))
    # the Reality Check's own NDCG@2 would be .6309 / 2.1309 = .2961: its ideal is over 3
    assert got["ndcg@2"] != pytest.approx(two / (one + two + 0.5))


def test_a_part_the_target_lacks_is_nan_and_averaged_over_those_who_have_it() -> None:
    got = nb.customer_metrics([], {"a"}, set(), ks=(10,))
    assert got["recall@10"] == 0 and got["ndcg@10"] == 0 and got["phr@10"] == 0
    assert math.isnan(got["recall_repeat@10"]) and math.isnan(got["phr_repeat@10"])
    assert got["recall_new@10"] == 0
    frame = nb.per_customer(
        {"u": ["a", "b"], "v": ["c"]},  # w gets nothing: zero
        {"u": {"a", "z"}, "v": {"c"}, "w": {"d"}},
        {"u": {"a"}, "w": {"d"}},
    )
    summary = nb.summarise(frame)
    assert summary["recall@10"] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-4)
    assert summary["recall_repeat@10"] == pytest.approx((1 + 0) / 2)  # u and w have repeats
    assert summary["recall_new@10"] == pytest.approx((0 + 1) / 2)  # u (z) and v (c)
    assert summary["phr@10"] == pytest.approx(2 / 3, abs=1e-4)


def test_bootstrap_interval_of_the_difference() -> None:
    same = nb.bootstrap_difference(np.ones(5), np.zeros(5))
    assert same == {"mean": 1.0, "low": 1.0, "high": 1.0, "customers": 5}
    ours, theirs = np.array([1.0, 0.0, 1.0, 0.0]), np.zeros(4)
    interval = nb.bootstrap_difference(ours, theirs, draws=200)
    low, high = interval["low"], interval["high"]
    assert low is not None and high is not None
    assert interval["mean"] == 0.5 and 0 <= low < 0.5 < high <= 1
    assert nb.bootstrap_difference(ours, theirs, draws=200) == interval  # fixed seed
    assert nb.bootstrap_difference(np.array([]), np.array([]))["mean"] is None


def test_score_reads_recommendations_and_compares_with_the_references(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = nb.make_split(_lines(PROTOCOL), test_share=0.34)
    (customer,) = split.test
    nb.write_folder(split, tmp_path)
    recs = tmp_path / "recs.csv"
    pd.DataFrame({"customer_id": [customer] * 2, "rank": [2, 1], "offer_id": ["n", "m"]}).to_csv(
        recs, index=False
    )
    figures = nb.score(recs, tmp_path)
    assert figures["metrics"]["nextbest"]["recall@10"] == 1.0
    assert figures["customers_without_recommendations"] == {"nextbest": 0}
    assert set(figures["metrics"]) == {*nb.REFERENCES, "nextbest"}
    # no new-to-you slate: the new-item target is not judged
    assert figures["targets"]["new_to_you_new_recall@10_gt_g_topfreq_new"] is None
    printed = capsys.readouterr().out
    assert "TIFU-KNN" in printed and "repeat items" in printed and "Recall@10" in printed
    # every item is a product here: the products-only table is the standard one again
    products = figures["products_only"]
    assert pd.DataFrame(products["metrics"]).equals(pd.DataFrame(figures["metrics"]))  # NaN too
    assert products["universe"]["items"] == products["universe"]["split_items"] == 2
    assert printed.index("all target items") < printed.index(nb.PRODUCTS_ONLY)
    assert "new-to-you slate: not judged" in printed
    # the new-to-you slate: the folder's file by default, or the one given
    pd.DataFrame({"customer_id": [customer], "rank": [1], "offer_id": ["x"]}).to_csv(
        tmp_path / nb.NEW_TO_YOU_FILE, index=False
    )
    figures = nb.score(recs, tmp_path)
    assert figures["metrics"][nb.NEW_TO_YOU]["recall@10"] == 0.0
    assert nb.NEW_TO_YOU in figures["products_only"]["metrics"]
    assert nb.score(recs, tmp_path, recs)["metrics"][nb.NEW_TO_YOU]["recall@10"] == 1.0
    assert nb.NEW_TO_YOU in capsys.readouterr().out
    # the --keep-non-products slate likewise, judged against TIFU-KNN on its own
    assert nb.KEEP_NON_PRODUCTS not in figures["metrics"]
    pd.DataFrame({"customer_id": [customer], "rank": [1], "offer_id": ["x"]}).to_csv(
        tmp_path / nb.KEEP_NON_PRODUCTS_FILE, index=False
    )
    figures = nb.score(recs, tmp_path)
    assert figures["metrics"][nb.KEEP_NON_PRODUCTS]["recall@10"] == 0.0
    assert figures["keep_non_products_targets"] == {
        "recall@10_ge_tifu_knn": False,
        "ndcg@10_ge_tifu_knn": False,
    }
    figures = nb.score(recs, tmp_path, keep_non_products_csv=recs)
    assert figures["metrics"][nb.KEEP_NON_PRODUCTS]["recall@10"] == 1.0
    assert figures["keep_non_products_targets"] == {
        "recall@10_ge_tifu_knn": True,
        "ndcg@10_ge_tifu_knn": True,
    }
    assert f"{nb.KEEP_NON_PRODUCTS} target (standard table): met" in capsys.readouterr().out


# -- products only ---------------------------------------------------------------------------------
COUPON = "COUPON/MISC ITEMS"


def test_the_universe_is_the_items_the_import_makes_an_offer_for() -> None:
    # the catalog's rule: coupon lines are not products; a placeholder category is not a
    # real one, but its items are products (items=True)
    assert nb_catalog.non_product_reason(COUPON, items=True) is not None
    assert nb_catalog.non_product_reason("NO COMMODITY DESCRIPTION", items=True) is None
    assert nb_catalog.non_product_reason("NO COMMODITY DESCRIPTION") is not None
    split = _split(
        {"t": [["a", "k"], ["p"]], "n": [["k"], ["a", "p"]]},
        {"t": ["a", "k"], "n": ["p"]},
        ["t"],
        {"k": COUPON, "p": "NO COMMODITY DESCRIPTION"},
    )
    universe = nb.product_universe(split)
    assert universe.items == {"a", "p"}
    assert universe.left_out == {COUPON: "coupon lines; miscellaneous till lines (open-ring keys)"}
    assert universe.split_items == 3
    assert nb.universe_targets(split.targets(), universe.items) == {"t": {"a"}}


# history baskets holding each item: k 4, a 3, c 2, b 1; k is a coupon line
PRODUCTS = {
    "t": [["a", "k"], ["k"]],
    "t2": [["a"], ["c"]],
    "n1": [["k"], ["k", "c"]],
    "n2": [["a"], ["b"]],
}


def _products_split() -> nb.Split:
    targets = {"t": ["b", "k"], "t2": ["k"], "n1": ["c"], "n2": ["a"]}
    return _split(PRODUCTS, targets, ["t", "t2"], {"k": COUPON})


def test_products_only_targets_and_topfreq_references_by_hand() -> None:
    split = _products_split()
    universe = nb.product_universe(split).items
    assert universe == {"a", "b", "c"}
    # t keeps b; t2's target was the coupon only: it drops out
    assert nb.universe_targets(split.targets(), universe) == {"t": {"b"}}
    standard = nb.topfreq_references(split, k=4)
    products = nb.topfreq_references(split, k=4, universe=universe)
    assert standard["G-TopFreq"] == {"t": ["k", "a", "c", "b"], "t2": ["k", "a", "c", "b"]}
    assert products["G-TopFreq"] == {"t": ["a", "c", "b"], "t2": ["a", "c", "b"]}
    assert standard["P-TopFreq"] == {"t": ["k", "a"], "t2": ["c", "a"]}
    assert products["P-TopFreq"] == {"t": ["a"], "t2": ["c", "a"]}
    assert standard["GP-TopFreq"] == {"t": ["k", "a", "c", "b"], "t2": ["c", "a", "k", "b"]}
    assert products["GP-TopFreq"] == {"t": ["a", "c", "b"], "t2": ["c", "a", "b"]}
    assert standard["G-TopFreq-new"] == {"t": ["c", "b"], "t2": ["k", "b"]}
    assert products["G-TopFreq-new"] == {"t": ["c", "b"], "t2": ["b"]}


def test_products_only_tifu_knn_zeroes_the_other_items_before_the_neighbour_search() -> None:
    # two history baskets, each its own group: the first weighs .9 × .36 / 2 = .162, the
    # last 1 × .6 / 2 = .3. Vectors: t {a: .162, k: .462}, n1 {k: .462, c: .3},
    # n2 {a: .162, b: .3}
    split = _products_split()
    universe = nb.product_universe(split).items
    # with k: n1 is t's nearest (.341 against .551); .2 t + .8 n1 = {k .462, c .24, a .032}
    assert nb.tifu_knn(split, num_nearest_neighbors=1)["t"] == ["k", "c", "a"]
    # k zeroed first: t {a: .162}; n2 is the nearest (.3 against .341), not n1 as above
    # (ranking the standard list without k would give [c, a]): {b .24, a .162}
    products = nb.tifu_knn(split, universe=universe, num_nearest_neighbors=1)
    assert products["t"] == ["b", "a"]
    # both neighbours: .2 t + .8 × {a .081, b .15, c .15} = {b .12, c .12, a .0972}; run
    # on a history without the coupon-only basket, t would be {a: .36} and c .144 first
    products = nb.tifu_knn(split, universe=universe, num_nearest_neighbors=2)
    assert products == {"t": ["b", "c", "a"], "t2": products["t2"]}
    assert not {item for ranked in products.values() for item in ranked} - universe


def test_the_products_only_table_beside_the_standard_one() -> None:
    split = _products_split()
    universe = nb.product_universe(split)
    lists, _ = nb.references(split)
    product_lists, _ = nb.references(split, universe.items)
    # t2's k is outside the universe: counted, scored as given
    lists[nb.NEXTBEST] = product_lists[nb.NEXTBEST] = {"t": ["b", "a"], "t2": ["a", "k"]}
    text, figures = nb.report(split, lists, (universe, product_lists))
    assert figures["customers_with"] == {"all": 2, "repeat": 1, "new": 2}  # k new to t2
    assert figures["metrics"]["nextbest"]["recall@10"] == pytest.approx((0.5 + 1) / 2)
    products = figures["products_only"]
    standard = set(figures) - {"products_only"}
    assert set(products) == {*standard, "universe", "nextbest_items_outside_universe"}
    assert products["customers_with"] == {"all": 1, "repeat": 0, "new": 1}
    assert products["universe"] | {"rule": None} == {
        "rule": None,
        "items": 3,
        "split_items": 4,
        "categories_left_out": {COUPON: "coupon lines; miscellaneous till lines (open-ring keys)"},
        "test_customers": 1,
        "test_customers_left_out": 1,
        "test_target_items": 1,
        "test_target_items_left_out": 2,
    }
    assert products["nextbest_items_outside_universe"] == {
        "nextbest": {"recommendations": 1, "customers": 1}
    }
    metrics = products["metrics"]
    # t's target is {b}: nextbest and TIFU-KNN ([b, c, a]) rank it first, G-TopFreq third
    assert metrics["nextbest"]["recall@10"] == metrics["TIFU-KNN"]["ndcg@10"] == 1.0
    assert metrics["G-TopFreq"]["ndcg@10"] == pytest.approx(0.5)
    assert metrics["P-TopFreq"]["recall@10"] == 0.0  # [a]
    assert products["targets"] == {
        "recall@10_ge_tifu_knn": True,
        "ndcg@10_ge_tifu_knn": True,
        "new_to_you_new_recall@10_gt_g_topfreq_new": None,  # no new-to-you slate
    }
    assert text.index("all target items (2 customers)") < text.index(nb.PRODUCTS_ONLY)
    assert "all target items (1 customers)" in text.split(nb.PRODUCTS_ONLY)[1]
    assert "target: not judged in full" in text.split(nb.PRODUCTS_ONLY)[1]


# -- nextbest (new to you) -------------------------------------------------------------------------
def test_the_new_to_you_rules_are_the_default_ones_with_null_consumable_repeat_rate(
    tmp_path: Path,
) -> None:
    path = nb.write_new_to_you_rules(tmp_path / "rules" / nb.NEW_TO_YOU_RULES)
    written = yaml.safe_load(path.read_text())
    expected = yaml.safe_load(DEFAULT_RULES.read_text())
    (owns,) = [rule for rule in expected["rules"] if rule["type"] == "already_owns"]
    assert owns["consumable_repeat_rate"] is not None
    owns["consumable_repeat_rate"] = None
    assert written == expected  # that one change, nothing else
    loaded, default = load_rules(path).model_dump(), load_rules().model_dump()
    changed = [
        (before, after)
        for before, after in zip(default["rules"], loaded["rules"], strict=True)
        if before != after
    ]
    assert [(b["type"], a["type"]) for b, a in changed] == [("already_owns", "already_owns")]
    ((before, after),) = changed
    assert after["consumable_repeat_rate"] is None
    assert {**before, "consumable_repeat_rate": None} == after
    assert {k: v for k, v in loaded.items() if k != "rules"} == {
        k: v for k, v in default.items() if k != "rules"
    }


def test_run_nextbest_repeats_the_batch_with_the_new_to_you_rules_on_its_own_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[str, ...], dict[str, object]]] = []

    def fake(folder: Path, *args: str, **options: object) -> tuple[float, str, str]:
        calls.append((args, options))
        return 1.0, '{"model_version": "7"}', f"said {options['log']}"

    class Offers:
        def __init__(self, path: Path) -> None:
            pass

        def read(self, table: str) -> pd.DataFrame:
            return pd.DataFrame({"offer_id": ["m"]})

    monkeypatch.setattr(nb, "_nextbest", fake)
    monkeypatch.setattr(features, "Workspace", Offers)
    pd.DataFrame({"customer_id": ["a"], "item_id": ["m"]}).to_csv(
        tmp_path / nb.TRUTH_FILE, index=False
    )
    outs, seconds, said = nb.run_nextbest(tmp_path, variants=False)
    assert outs == {
        nb.NEXTBEST: tmp_path / nb.RECS_FILE,
        nb.NEW_TO_YOU: tmp_path / nb.NEW_TO_YOU_FILE,
    }
    assert [args[0] for args, _ in calls] == [
        "import",
        "train",
        "recommend-batch",
        "recommend-batch",
    ]
    (standard, plain), (new, options) = calls[2:]
    assert standard[-2:] == ("--out", str(outs[nb.NEXTBEST]))
    assert new == (*standard[:-1], str(outs[nb.NEW_TO_YOU]))  # the same arguments
    assert "--no-holdout" in new and "--alias" in new
    assert "rules" not in plain and "ledger" not in plain
    assert options["rules"] == tmp_path / nb.NEW_TO_YOU_RULES
    assert options["ledger"] == nb.NEW_TO_YOU_LEDGER != nb.LEDGER_FILE
    rules = load_rules(tmp_path / nb.NEW_TO_YOU_RULES)
    assert (
        rules.rules[[r.type for r in rules.rules].index("already_owns")].model_dump()[
            "consumable_repeat_rate"
        ]
        is None
    )
    assert set(seconds) == {"import", "train", "recommend_batch", "recommend_batch_new_to_you"}
    assert said["recommend_batch_new_to_you_said"] == "said recommend_batch_new_to_you.log"


def test_the_keep_non_products_variant_repeats_the_standard_commands_in_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, tuple[str, ...], dict[str, object]]] = []

    def fake(folder: Path, *args: str, **options: object) -> tuple[float, str, str]:
        calls.append((folder, args, options))
        return 1.0, '{"model_version": "7"}', f"said {options['log']}"

    class Offers:
        def __init__(self, path: Path) -> None:
            self.path = path

        def read(self, table: str) -> pd.DataFrame:
            return pd.DataFrame(
                {
                    "offer_id": ["m", "fuel"]
                    if nb.KEEP_NON_PRODUCTS_FOLDER in self.path.parts
                    else ["m"]
                }
            )

    monkeypatch.setattr(nb, "_nextbest", fake)
    monkeypatch.setattr(features, "Workspace", Offers)
    pd.DataFrame({"customer_id": ["a", "a"], "item_id": ["m", "fuel"]}).to_csv(
        tmp_path / nb.TRUTH_FILE, index=False
    )
    outs, seconds, said = nb.run_nextbest(tmp_path)
    own = tmp_path / nb.KEEP_NON_PRODUCTS_FOLDER
    assert outs[nb.KEEP_NON_PRODUCTS] == tmp_path / nb.KEEP_NON_PRODUCTS_FILE
    assert len(outs) == 3 and own.is_dir()
    # the standard slate, the new-to-you batch, then the variant's import, train and batch
    assert [(folder, args[0]) for folder, args, _ in calls] == [
        (tmp_path, "import"),
        (tmp_path, "train"),
        (tmp_path, "recommend-batch"),
        (tmp_path, "recommend-batch"),
        (own, "import"),
        (own, "train"),
        (own, "recommend-batch"),
    ]
    (_, imported, _), (_, trained, _), (_, batch, _) = calls[:3]
    (_, keep_import, _), (_, keep_train, keep_options), (_, keep_batch, batch_options) = calls[4:]
    # the same commands: the import adds --keep-non-products, all in the variant's folder
    # on the same split (lines and test customers from the top folder)
    assert "--keep-non-products" not in imported
    assert [a for a in keep_import if a != "--keep-non-products"] == [
        str(own / "workspace") if a == str(tmp_path / "workspace") else a for a in imported
    ]
    assert keep_import.count("--keep-non-products") == 1
    assert str(tmp_path / nb.LINES_FILE) in keep_import
    assert keep_train == ("train", "--quiet", "-w", str(own / "workspace"))
    assert trained == ("train", "--quiet", "-w", str(tmp_path / "workspace"))
    assert keep_batch == (
        *[str(own / "workspace") if a == str(tmp_path / "workspace") else a for a in batch[:-1]],
        str(outs[nb.KEEP_NON_PRODUCTS]),
    )
    assert str(tmp_path / nb.TEST_FILE) in keep_batch and "--no-holdout" in keep_batch
    # its own home and ledger (the folder given), the product's rules
    assert "rules" not in batch_options and "ledger" not in batch_options
    assert keep_options == {"log": "train.log"}
    assert set(seconds) == {
        "import",
        "train",
        "recommend_batch",
        "recommend_batch_new_to_you",
        "keep_non_products_import",
        "keep_non_products_train",
        "keep_non_products_recommend_batch",
    }
    assert said["keep_non_products"] == {
        "model_version": "7",
        "recommend_batch_said": "said recommend_batch.log",
        "nextbest_offers": 2,
        "test_target_items_with_an_offer": 1.0,
    }
    assert said["nextbest_offers"] == 1 and said["test_target_items_with_an_offer"] == 0.5


def test_the_variants_env_skips_the_keep_non_products_slate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []

    def fake_run(folder: Path, *, variants: bool = True) -> tuple[dict, dict, dict]:
        seen.append(variants)
        return {}, {}, {}

    split = nb.make_split(_lines(PROTOCOL), test_share=0.34)
    monkeypatch.setattr(nb, "demo_lines", lambda: _lines(PROTOCOL))
    monkeypatch.setattr(nb, "make_split", lambda lines: split)
    monkeypatch.setattr(nb, "run_nextbest", fake_run)
    monkeypatch.setattr(nb, "report", lambda *args: ("", {}))
    monkeypatch.setenv(nb.KEEP_ENV, str(tmp_path))
    monkeypatch.setenv(nb.VARIANTS_ENV, "0")
    assert nb.run()["nextbest_variants_run"] is False
    monkeypatch.delenv(nb.VARIANTS_ENV)
    assert nb.run()["nextbest_variants_run"] is True
    assert seen == [False, True]


def test_the_weeks_env_keeps_the_last_weeks_of_lines_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a basket's lines are at its day, minute 0, 1, ...
    lines = _lines(PROTOCOL)
    last = lines["time"].max()  # c's day 6, minute 2
    assert last == T0 + pd.Timedelta(days=6, minutes=2)
    kept = nb.last_weeks(lines, 3 / 7)  # 3 days: from day 3, minute 2 on
    assert kept["time"].min() >= T0 + pd.Timedelta(days=3, minutes=2)
    assert sorted(set(kept["basket_id"])) == ["c-005", "c-006", "d-004"]
    assert len(kept) == 1 + 3 + 1  # c-005 n; c-006 m n s; d-004 m (c-003 is day 3 minute 0)
    assert nb.last_weeks(lines, None) is lines

    given: list[int] = []
    monkeypatch.setattr(nb, "demo_lines", lambda: lines)
    monkeypatch.setattr(
        nb,
        "make_split",
        lambda kept: (
            given.append(len(kept))
            or nb.Split(pairs=kept, lines=kept, test=np.array([], dtype=object))
        ),
    )
    monkeypatch.setattr(nb, "write_folder", lambda split, folder: {})
    monkeypatch.setattr(nb, "all_references", lambda split: ({}, {}, {}, {}))
    monkeypatch.setattr(nb, "report", lambda *args: ("", {}))
    monkeypatch.setattr(nb.Split, "sizes", lambda self: {})
    monkeypatch.setenv(nb.SKIP_ENV, "1")
    monkeypatch.setenv(nb.KEEP_ENV, str(tmp_path))
    monkeypatch.setenv(nb.WEEKS_ENV, "0.5")  # 3.5 days: from day 2, 12:02 on
    assert nb.run()["history_weeks"] == 0.5
    monkeypatch.delenv(nb.WEEKS_ENV)
    assert nb.run()["history_weeks"] is None
    # day 3 on (a-003 m r, c-003 m, d-003 n, e-003 n, f-003 r2, c-005, c-006, d-004)
    assert given == [2 + 1 + 1 + 1 + 1 + 1 + 3 + 1, len(lines)]


# t's target: a (bought before) and z (new); G-TopFreq-new ranks the eleven p items (3
# history baskets each) before z (1): its top 10 misses z. t2's target is a repeat only.
POPULAR = [f"p{i:02d}" for i in range(11)]
NEW_TO_YOU = {
    "t": [["a"], ["a"]],
    "t2": [["a"], ["p00"]],
    "n1": [POPULAR, POPULAR, POPULAR],
    "n2": [["z"], ["a"]],
}


def test_the_new_to_you_slate_is_scored_in_both_tables_and_judges_the_new_item_target() -> None:
    targets = {"t": ["a", "z"], "t2": ["a"], "n1": ["p00"], "n2": ["a"]}
    split = _split(NEW_TO_YOU, targets, ["t", "t2"])
    universe = nb.product_universe(split)
    lists, _ = nb.references(split)
    product_lists, _ = nb.references(split, universe.items)
    assert lists["G-TopFreq-new"]["t"] == [*POPULAR, "z"]  # z 12th
    # vectors: p .6105 in n1 (three groups), a .462 in t; TIFU-KNN's top 10 for t is the
    # p items (.8 × .6105 / 2 = .2442 against a's .2 × .462 + .8 × .3 / 2 = .2124)
    assert lists["TIFU-KNN"]["t"][:10] == POPULAR[:10]
    slates = {nb.NEXTBEST: {"t": ["a", "p00"], "t2": ["a"]}, nb.NEW_TO_YOU: {"t": ["z", "p00"]}}
    lists |= slates
    product_lists |= slates
    text, figures = nb.report(split, lists, (universe, product_lists))
    assert figures["customers_with"] == {"all": 2, "repeat": 2, "new": 1}
    metrics = figures["metrics"]
    assert list(metrics) == [*nb.REFERENCES, nb.NEXTBEST, nb.NEW_TO_YOU]
    assert metrics[nb.NEXTBEST]["recall@10"] == 0.75  # (1/2 + 1) / 2
    assert metrics[nb.NEW_TO_YOU]["recall@10"] == 0.25  # t2 got nothing: 0
    assert metrics[nb.NEW_TO_YOU]["recall_new@10"] == 1.0
    assert metrics[nb.NEW_TO_YOU]["ndcg_new@10"] == 1.0
    assert metrics[nb.NEW_TO_YOU]["recall_repeat@10"] == 0.0
    assert metrics["G-TopFreq-new"]["recall_new@10"] == 0.0
    assert metrics[nb.NEXTBEST]["recall_new@10"] == 0.0
    assert figures["customers_without_recommendations"] == {nb.NEXTBEST: 0, nb.NEW_TO_YOU: 1}
    assert figures["top10_share_bought_before"] == {nb.NEXTBEST: 0.6667, nb.NEW_TO_YOU: 0.0}
    # the new-item target on the new-to-you slate, the others on the standard one
    assert figures["nextbest_new_to_you_minus_g_topfreq_new_95ci"] == {
        "recall_new@10": {"mean": 1.0, "low": 1.0, "high": 1.0, "customers": 1}
    }
    assert figures["nextbest_minus_g_topfreq_new_95ci"]["recall_new@10"]["mean"] == 0.0
    assert figures["nextbest_minus_tifu_knn_95ci"]["recall@10"]["mean"] == 0.75
    assert figures["targets"] == {
        "recall@10_ge_tifu_knn": True,
        "ndcg@10_ge_tifu_knn": True,
        "new_to_you_new_recall@10_gt_g_topfreq_new": True,
    }
    assert figures["target_slates"]["new_to_you_new_recall@10_gt_g_topfreq_new"] == nb.NEW_TO_YOU
    standard_text, product_text = text.split(nb.PRODUCTS_ONLY)
    for part in (standard_text, product_text):
        assert f"\n{nb.NEW_TO_YOU}  " in part
        assert "target: met" in part
        assert "new-item Recall@10 > G-TopFreq-new, new-to-you slate: yes" in part
        assert "Recall@10 ≥ TIFU-KNN, standard slate: yes" in part
    # every item is a product: the products-only table scores the same
    products = figures["products_only"]
    assert pd.DataFrame(products["metrics"]).equals(pd.DataFrame(metrics))
    assert products["targets"] == figures["targets"]
    assert products["nextbest_items_outside_universe"] == {
        nb.NEXTBEST: {"recommendations": 0, "customers": 0},
        nb.NEW_TO_YOU: {"recommendations": 0, "customers": 0},
    }


def test_the_keep_non_products_slate_is_judged_against_tifu_knn_in_the_standard_table() -> None:
    split = _products_split()
    universe = nb.product_universe(split)
    lists, _ = nb.references(split)
    product_lists, _ = nb.references(split, universe.items)
    # the variant ranks t2's coupon item k (outside the universe) first
    slates = {
        nb.NEXTBEST: {"t": ["b", "a"], "t2": ["a"]},
        nb.KEEP_NON_PRODUCTS: {"t": ["b", "a"], "t2": ["k", "a"]},
    }
    lists |= slates
    product_lists |= slates
    text, figures = nb.report(split, lists, (universe, product_lists))
    metrics = figures["metrics"]
    assert list(metrics) == [*nb.REFERENCES, nb.NEXTBEST, nb.KEEP_NON_PRODUCTS]
    assert metrics[nb.KEEP_NON_PRODUCTS]["recall@10"] >= metrics[nb.NEXTBEST]["recall@10"]
    keep = figures["nextbest_keep_non_products_minus_tifu_knn_95ci"]
    tifu = figures["nextbest_minus_tifu_knn_95ci"]
    for column in ("recall@10", "ndcg@10"):
        difference = metrics[nb.KEEP_NON_PRODUCTS][column] - metrics["TIFU-KNN"][column]
        assert keep[column]["mean"] == pytest.approx(difference, abs=1e-4)
        assert keep[column]["customers"] == tifu[column]["customers"] == 2
    assert figures["keep_non_products_targets"] == {
        f"{column}_ge_tifu_knn": metrics[nb.KEEP_NON_PRODUCTS][column]
        >= metrics["TIFU-KNN"][column]
        for column in ("recall@10", "ndcg@10")
    }
    # the existing targets stay on the default import's slates
    assert set(figures["targets"]) == {
        "recall@10_ge_tifu_knn",
        "ndcg@10_ge_tifu_knn",
        "new_to_you_new_recall@10_gt_g_topfreq_new",
    }
    assert figures["customers_without_recommendations"] == {
        nb.NEXTBEST: 0,
        nb.KEEP_NON_PRODUCTS: 0,
    }
    standard_text, product_text = text.split(nb.PRODUCTS_ONLY)
    assert f"{nb.KEEP_NON_PRODUCTS} − TIFU-KNN (95 % customer bootstrap)" in standard_text
    assert f"{nb.KEEP_NON_PRODUCTS} target (standard table): " in standard_text
    # products only: scored as given, its outside items counted, not judged
    products = figures["products_only"]
    assert nb.KEEP_NON_PRODUCTS in products["metrics"]
    assert "nextbest_keep_non_products_minus_tifu_knn_95ci" not in products
    assert "keep_non_products_targets" not in products
    assert products["nextbest_items_outside_universe"][nb.KEEP_NON_PRODUCTS] == {
        "recommendations": 1,
        "customers": 1,
    }
    assert f"{nb.KEEP_NON_PRODUCTS} − TIFU-KNN" not in product_text
    assert "judged in the standard table only" in product_text
