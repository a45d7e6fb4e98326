"""No import circle anywhere in the product: every module of loquetier/, kernels/, workers/ and
producers/ can be understood (and imported) after the modules it uses, never together with them.

The graph is read with ``ast`` (import_graph.py), so a lazy import inside a function or one under
``if TYPE_CHECKING:`` counts too: moving an import into a function hides a circle from Python,
not from this test.
"""

from __future__ import annotations

from import_graph import cycles, internal_edges, load_modules, one_cycle


def test_the_product_has_no_import_cycle() -> None:
    edges = internal_edges(load_modules())
    loops = [" -> ".join(one_cycle(component, edges)) for component in cycles(edges)]
    assert not loops, "import cycles:\n" + "\n".join(loops)


def test_the_graph_covers_every_product_folder() -> None:
    modules = load_modules()
    for package in ("loquetier.engine.engine", "loquetier.models.llama", "loquetier.kernels.ops",
                    "loquetier.workers.runtime", "loquetier.producers.client", "loquetier.db.repo"):
        assert package in modules, package
    edges = internal_edges(modules)
    assert "loquetier.engine.kv_cache" in edges["loquetier.engine.engine"]
    assert "loquetier.kernels.meta" in edges["loquetier.kernels.ops"]  # relative imports resolve


def test_the_detector_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    [component] = cycles(edges)
    assert component == ["a", "b", "c"]
    assert one_cycle(component, edges) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": set()}) == []
