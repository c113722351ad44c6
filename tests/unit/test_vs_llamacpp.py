"""bench/vs_llamacpp.py's pure parts: arguments, the result table and ratios, the skip path.
Nothing is built or started."""

from __future__ import annotations

import pytest

from bench import llamacpp, vs_llamacpp


def test_precisions_parsed_and_checked(tmp_path) -> None:
    args = vs_llamacpp.parse_args(["--precisions", "bf16, q4_1", "--cache-dir", str(tmp_path)])
    assert args.precisions == ["bf16", "q4_1"]
    assert args.cache_dir == tmp_path
    assert vs_llamacpp.parse_args([]).cache_dir == llamacpp.default_cache_dir()
    assert args.phases == ["batch", "single", "loras"]  # the long phase only when asked
    assert vs_llamacpp.parse_args(["--phases", "long,single"]).phases == ["long", "single"]
    for bad in (["--precisions", "bf16,int3"], ["--precisions", ","], ["--repeat", "0"],
                ["--phases", "batch,prefill"], ["--phases", ""], ["--context", "0"]):
        with pytest.raises(SystemExit):
            vs_llamacpp.parse_args(bad)


def _cell(tok_s: float, decode: float | None = None, prefill_s: float = 0.1,
          prompt_tokens: int = 5) -> dict:
    return {"wall_s": 1.0, "tokens": 10, "tok_s": tok_s, "decode_tok_s": decode,
            "prompt_tokens": prompt_tokens, "prefill_s": prefill_s}


def test_table_and_ratios() -> None:
    cells = {
        "peftserve": {"batch": _cell(500.0), "single": _cell(50.0, 55.0),
                      "loras": _cell(450.0)},
        "llama.cpp": {"batch": _cell(200.0), "single": _cell(80.0, 88.0),
                      "loras": _cell(50.0)},
    }
    r = vs_llamacpp.ratios(cells)
    assert r == pytest.approx({
        "peftserve_vs_llamacpp_batch": 2.5, "peftserve_vs_llamacpp_single": 0.625,
        "peftserve_vs_llamacpp_single_decode": 0.625, "peftserve_vs_llamacpp_loras": 9.0,
        "peftserve_loras_vs_own_batch": 0.9, "llama.cpp_loras_vs_own_batch": 0.25})
    # a precision peftserve does not serve yet: llama.cpp's row only, no cross ratios
    only_llama = {"llama.cpp": {"batch": _cell(130.0), "single": _cell(100.0, 120.0)}}
    assert vs_llamacpp.ratios(only_llama) == {}
    text = vs_llamacpp.table({"bf16": {"systems": cells}, "q4_1": {"systems": only_llama}})
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2] == "| peftserve bf16 | 500.0 | 50.0 (55.0) | 450.0 (0.90x) |"
    assert lines[3] == "| llama.cpp bf16 | 200.0 | 80.0 (88.0) | 50.0 (0.25x) |"
    assert lines[4] == "| llama.cpp q4_1 | 130.0 | 100.0 (120.0) | - |"


def test_round_ratios_pair_each_round() -> None:
    # three rounds: the median of the same-round ratios, not the ratio of the best rounds
    runs = {
        "peftserve": {"single": [_cell(90.0, 100.0), _cell(75.0, 80.0), _cell(88.0, 99.0)],
                      "batch": [_cell(300.0)]},
        "llama.cpp": {"single": [_cell(60.0, 80.0), _cell(70.0, 78.0), _cell(80.0, 90.0)],
                      "batch": [_cell(150.0)], "loras": [_cell(60.0)]},
    }
    r = vs_llamacpp.round_ratios(runs)
    assert r == pytest.approx({
        "peftserve_vs_llamacpp_single": 1.1,  # rounds 1.5, 75/70, 1.1
        "peftserve_vs_llamacpp_single_decode": 1.1,  # rounds 1.25, 80/78, 1.1
        "peftserve_vs_llamacpp_batch": 2.0})  # no peftserve loras round: no loras ratio


def test_long_phase_table_and_ratios() -> None:
    # the long phase alone: its own table, prefill as a speed ratio (llama.cpp's time over ours)
    cells = {"peftserve": {"long": _cell(8.0, 50.0, prefill_s=6.0, prompt_tokens=2000)},
             "llama.cpp": {"long": _cell(6.0, 33.0, prefill_s=7.5, prompt_tokens=2000)}}
    r = vs_llamacpp.ratios(cells)
    assert r == pytest.approx({"peftserve_vs_llamacpp_long_decode": 50.0 / 33.0,
                               "peftserve_vs_llamacpp_long_prefill": 1.25})
    lines = vs_llamacpp.table({"bf16": {"systems": cells}}).splitlines()
    assert lines[0].startswith("| system | long prompt, tokens | prefill, s |")
    assert lines[2:] == ["| peftserve bf16 | 2000 | 6.00 | 50.0 |",
                         "| llama.cpp bf16 | 2000 | 7.50 | 33.0 |"]


def test_summarize_counts_decode_apart() -> None:
    recs = [{"tokens": 10, "decode_tokens": 9, "decode_s": 0.5, "prompt_tokens": 3,
             "prefill_s": 0.25},
            {"tokens": 20, "decode_tokens": 19, "decode_s": 1.5, "prompt_tokens": 4,
             "prefill_s": 0.5}]
    s = vs_llamacpp.summarize(recs, wall=3.0)
    assert s["tok_s"] == pytest.approx(10.0)
    assert s["decode_tok_s"] == pytest.approx(14.0)
    assert s["prompt_tokens"] == 7
    assert s["prefill_s"] == pytest.approx(0.75)


def test_skips_with_a_line_naming_what_is_missing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    monkeypatch.setattr(llamacpp.sys, "executable", str(tmp_path / "bin" / "python"))
    assert vs_llamacpp.main(["--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("SKIP bench/vs_llamacpp.py")
    assert "C compiler" in out[0] and "C++ compiler" in out[0] and "cmake" in out[0]
    assert not (tmp_path / "cache").exists()  # nothing fetched or built


def test_a_cached_binary_needs_no_tools(monkeypatch) -> None:
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    assert llamacpp.missing_tools(cached_binary=True) == []
    assert "cmake" in " ".join(llamacpp.missing_tools(cached_binary=False))
