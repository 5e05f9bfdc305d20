"""Test order for ``make test``: the slowest files first.

``make test`` runs each file whole on one of the pytest-xdist workers (``--dist loadfile``) and
hands the files out in collection order (``--no-loadscope-reorder``: xdist's own reordering
puts the files with the most tests first, which left the few long simulations for last, one
worker idle while the other finished them). Starting the long ones first lets the many short
files fill the gaps. The three files that simulate the whole-network test board share one
Verilator build (``sim.runner`` makes the others wait while one builds), so the first of them
starts beside the long file that needs no Verilator build.
"""

#: Files in the order they start, slowest first (their wall time on the 2-core CI machine);
#: the rest follow in pytest's order.
SLOW_FIRST = (
    "test_network_end_to_end.py",   # the whole-network board's build, then ~40 simulations
    "test_fixed_unit.py",           # amaranth.sim of the fixed-point unit, no Verilator
    "test_cocotb_gemm.py",          # two device cores on Verilator
    "test_fuzz.py",                 # 400 fuzzed frames on the whole-network board
    "test_inference.py",            # the whole-network board again
    "test_cocotb_array.py",
    "test_docs.py",                 # sim.board's default build, a training run
    "test_build.py",                # the first YoWASP call, a real iCE40 build
    "test_end_to_end.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(SLOW_FIRST)}
    # sorted() is stable: within a file, and among the other files, pytest's order stays.
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
