"""benchmarks/make_table.py's sections (the IGD bound, training, the projections, --update) on
hand-made benchmark lists."""
import importlib
from pathlib import Path

import pytest
import torch

from tests.helpers import benchmark_module

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """Imports of benchmarks/ modules by name, on sys.path meanwhile (they import each other)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module


@pytest.fixture(scope="module")
def make_table(bench):
    return bench("make_table")


@pytest.fixture(scope="module")
def render(bench):
    return bench("render")


def as_records(benchmarks: list[dict]) -> list:
    return [importlib.import_module("records").from_benchmark(b) for b in benchmarks]


def case(kernel: str, provider: str, seconds: float, images: int, **info) -> dict:
    extra = {"kernel": kernel, "provider": provider, "images": images, "batch": images, "threads": 2,
             "config": "demo", "path": "igd", **info}
    return {"group": f"{kernel} | demo | IGD", "name": kernel, "extra_info": extra,
            "stats": {"median": seconds, "min": seconds}}


def suite(free_step: float) -> list[dict]:
    """Ceiling 100 GFLOP/s; influence gradient 0.1 GFLOP per image; reference step 1 s per image."""
    flops = {"total": 9e9, "dit": 1e9, "codec": 1e9, "classifiers": 1e9, "other": 2e9}
    return [
        case("mm", "torch", 1.0, 1, flops={"total": 1e11}),
        case("guided_step", "fast", 3.0, 30, flops=flops),
        case("guided_step", "compiled", 0.15 * 10, 10),
        case("guided_step", "influence-free", free_step * 10, 10),
        case("guided_step", "reference", 1.0, 1),
        case("guided_sampling", "compiled", 0.5 * 10, 10, guided_steps=4),
        case("guided_sampling", "influence-free", 0.1 * 10, 10, guided_steps=4),
        case("guided_sampling", "reference", 2.0, 1, guided_steps=4),
    ]


def bound(make_table, benchmarks: list[dict]) -> str:
    found = as_records(benchmarks)
    return make_table.igd_bound(found, make_table.projection.ceilings(found)) or ""


def test_influence_rate_needed_for_the_goal(make_table):
    benchmarks = suite(free_step=0.05)
    text = bound(make_table, benchmarks)
    assert make_table.projection.influence_flops(as_records(benchmarks)) == pytest.approx(1e8)
    assert "20.00x (one step, batch 10) and 20.00x (whole sampling, batch 10)" in text
    # step: 10x allows 0.1 s/image, the rest takes 0.05, so 0.1 GFLOP in 0.05 s; compiled spends 0.1 s
    assert "one step: 2 GFLOP/s (2 % of the matmul ceiling), against 1 GFLOP/s (1 %) compiled" in text
    # sampling: 4 guided steps = 0.4 GFLOP in 0.2 - 0.1 s; compiled spends 0.4 s
    assert "whole sampling: 4 GFLOP/s (4 % of the matmul ceiling), against 1 GFLOP/s (1 %) compiled" in text


def test_goal_out_of_reach_when_the_rest_is_too_slow(make_table):
    assert "one step: more than any rate: the rest alone is too slow" in bound(make_table, suite(free_step=0.2))


def test_no_bound_without_the_influence_free_rows(make_table):
    benchmarks = [b for b in suite(0.05) if b["extra_info"]["provider"] != "influence-free"]
    assert bound(make_table, benchmarks) == ""


def training_case(provider: str, seconds: float, members: int = 1, config: str = "demo") -> dict:
    extra = {"kernel": "training", "provider": provider, "config": config, "members": members,
             "images_per_call": 1000 * members, "flops_per_image": 1e7, "network": "convnet3", "width": 32,
             "size": 32, "channels": 1, "images": 100, "recipe": "dc", "epochs": 10, "threads": 2}
    return {"group": f"training | {config}", "name": provider, "extra_info": extra,
            "stats": {"median": seconds, "min": seconds}}


def test_training_rows_goal_and_splice(make_table):
    benchmarks = as_records([case("mm", "torch", 1.0, 1, flops={"total": 1e11}), training_case("reference", 1.0),
                             training_case("compiled", 0.5), training_case("group-loop x5", 2.0, members=5)])
    text = make_table.training_section(benchmarks, make_table.projection.ceilings(benchmarks))
    # 1000 images/s x 10 MFLOP = 10 GFLOP/s = 10 % of the 100 GFLOP/s ceiling; the group: 2500/s
    assert "| reference | 1 | 1,000 | 1x | 10 | 10% |  |" in text
    assert "Best: group-loop x5 at 2.50x (met)" in text
    old = "# Benchmarks\n\n## Machine\n\nx\n\n## Classifier training\n\nstale\n\n## Other benchmarks\n\ny\n"
    spliced = make_table.splice(old, "## Classifier training\n\nnew\n")
    assert "stale" not in spliced and spliced.count("## Classifier training") == 1
    # replaced where it stood; a section the document lacked goes at the end
    assert spliced.index("## Machine") < spliced.index("new") < spliced.index("## Other benchmarks")
    appended = make_table.splice(old, "## Classifier training\n\nnew\n\n## Fresh\n\nz\n")
    assert appended.rstrip().endswith("## Fresh\n\nz") and appended.count("## Other benchmarks") == 1
    assert make_table.splice(old, "") == old


def test_whole_run_projection_counts_every_training(make_table):
    record = {"group": "training | FLOP count", "name": "count", "stats": {"median": 1.0, "min": 1.0},
              "extra_info": {"kernel": "training_flop_count", "flops_per_image": {"convnet6": 1e10}}}
    text = make_table.training_projection(as_records([record]))
    # IPC 50, distill: reference + surrogate 2 x 50 x 9469; stages on 100 x 2000, 200..400 x 1500 images
    distill = 100 * 9469 + 100 * 2000 + (200 + 300 + 400) * 1500
    assert f"| 50 |  | {distill * 1e10 / 1e15:.3g} |" in text


def test_gpu_memory_section_and_update_replace_only_their_sections(make_table):
    row = {"kind": "lgd", "precision": "bf16", "checkpoint_decoder": True, "weights_bytes": 2 * 2**30,
           "per_batch": {"1": 3 * 2**30, "30": 40 * 2**30}, "fits": {"40 GB": 27, "80 GB": 63}}
    record = {"group": "memory", "name": "memory", "stats": {"median": 1.0, "min": 1.0},
              "extra_info": {"kernel": "memory_count", "nette": {"batch_size": 30, "checkpoints": 4},
                             "cards": {"40 GB": 39.4, "80 GB": 79.1}, "headroom": 0.1, "models": "DiT-XL/2",
                             "rows": [row]}}
    text = make_table.gpu_memory_section(as_records([record]))
    assert "| LGD | bf16 | on | 2 | 3 | 40 | 27 | 63 |" in text and "Counted, not measured" in text
    old = "# Benchmarks\n\n## Classifier training\n\nkept\n\n" + make_table.GPU_MEMORY_TITLE + "\n\nstale\n"
    spliced = make_table.splice(old, text + "\n")
    assert "stale" not in spliced and "kept" in spliced and spliced.count(make_table.GPU_MEMORY_TITLE) == 1


def test_live_peak_counts_storages_while_they_live():
    measure = benchmark_module("_measure")
    meta = torch.device("meta")

    def run():
        a = torch.zeros(1024, device=meta)  # 4 KiB
        b = a * 2  # 8 KiB live
        view = b.view(32, 32)  # a view: no new storage
        del a
        c = view * 2  # b and c: 8 KiB live again
        return c.sum()  # and its 4 bytes, while b (through the view) and c still live

    assert measure.live_peak(run) == 8192 + 4


# ---------------------------------------------------------------------------------------------
# The generic renderer


def test_fmt_and_table(render):
    assert [render.fmt(x) for x in (None, 0, 1234.5, 0.012345, 12.345)] == ["-", "0", "1,234", "0.0123", "12.3"]
    assert render.fmt(2.345, 2) == "2.3"
    assert render.table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |", ""]


def test_records_table_by_field_config_key_or_function(render):
    rows = as_records([case("guided_step", p, s, n, config=c) for p, s, n, c in
                       (("fast", 1.0, 30, "demo"), ("fast", 2.0, 30, "demo"), ("reference", 1.0, 1, "demo"),
                        ("fast", 4.0, 30, "dit-b2"))])
    columns = [("provider", "provider"), ("config", "preset"), ("images/s", lambda r: render.fmt(r.ips()))]
    assert render.records_table(rows, columns) == [
        "| provider | config | images/s |", "|---|---|---|", "| fast | demo | 30 |", "| fast | demo | 15 |",
        "| reference | demo | 1 |", "| fast | dit-b2 | 7.5 |", ""]
    # one row per combination of the `unique` fields: the first record of each
    assert render.records_table(rows, columns, unique=("preset", "provider"))[2:-1] == [
        "| fast | demo | 30 |", "| reference | demo | 1 |", "| fast | dit-b2 | 7.5 |"]


def test_template_blocks_and_fill(render):
    template = "note to editors\n<!-- a -->\n# {title}\n\n<!-- b -->\n\n- x\n- {y:.1f}\n\n{p}\n\ntail\n"
    blocks = render.blocks(template)
    assert blocks == {"a": "# {title}", "b": "- x\n- {y:.1f}\n\n{p}\n\ntail"}
    assert render.fill(blocks["b"], y=2.25, p=["| t |", ""]) == "- x\n- 2.2\n\n| t |\n\ntail"
    # a line whose value is None is left out: a paragraph with its blank line, a list item alone
    assert render.fill(blocks["b"], y=1.0, p=None) == "- x\n- 1.0\n\ntail"
    assert render.fill(blocks["b"], y=None, p="p") == "- x\n\np\n\ntail"
    with pytest.raises(KeyError):
        render.fill(blocks["a"])


def test_the_committed_benchmarks_md_is_the_stored_runs_rendered(make_table):
    """BENCHMARKS.md is make_table's output for the JSON kept in benchmarks/results/ (docs/benchmarking.md):
    a template or renderer change without regenerating it, or a hand edit, fails here."""
    stored = [BENCHMARKS / "results" / f"{name}.json" for name in ("guided", "training", "norm_relu_pool")]
    text = make_table.render(stored)
    assert text.startswith("# Benchmarks\n\nGenerated by `benchmarks/make_table.py`") and text.endswith("\n")
    assert "{" not in text and "\n\n\n\n" not in text
    committed = (BENCHMARKS.parent / "BENCHMARKS.md").read_text()
    run_line = lambda t: [line for line in t.splitlines() if not line.startswith("- Run: ")]  # paths as passed
    assert run_line(text) == run_line(committed)
