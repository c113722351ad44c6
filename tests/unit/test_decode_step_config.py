"""The static decode step's settings: the flags, the config checks, the graph buckets."""

from __future__ import annotations

import pytest

from peftserve import serve_config
from peftserve.cli import build_parser
from peftserve.config import EngineConfig
from peftserve.engine.cuda_graphs import default_sizes


def test_serve_flags_reach_the_engine_config():
    args = build_parser().parse_args(
        ["serve", "--no-cuda-graphs", "--max-cuda-graph-batch", "16", "--max-cuda-graph-len",
         "4096", "--decode-step", "static", "--prefill-rows", "off"]  # fmt: skip
    )
    assert args.cuda_graphs is False
    values = {"cuda_graphs": args.cuda_graphs, "max_cuda_graph_batch": args.max_cuda_graph_batch,
              "max_cuda_graph_len": args.max_cuda_graph_len,
              "decode_step": args.decode_step, "prefill_rows": args.prefill_rows}  # fmt: skip
    engine = serve_config.build(values).engine
    assert (engine.cuda_graphs, engine.max_cuda_graph_batch, engine.max_cuda_graph_len,
            engine.decode_step, engine.prefill_rows) == (False, 16, 4096, "static", "off")
    assert serve_config.build({}).engine.prefill_rows == "graphs"  # fmt: skip
    assert build_parser().parse_args(["serve"]).cuda_graphs is None  # not given: the default
    assert serve_config.build({}).engine.cuda_graphs is True


@pytest.mark.parametrize(("flag", "field"), [("--no-overlap-outputs", "overlap_outputs"),
                                             ("--no-schedule-ahead", "schedule_ahead")])
def test_the_overlaps_can_be_turned_off(flag, field):
    args = build_parser().parse_args(["serve", flag])
    engine = serve_config.build({field: getattr(args, field)}).engine
    assert getattr(engine, field) is False
    default = getattr(build_parser().parse_args(["serve"]), field)
    assert getattr(serve_config.build({field: default}).engine, field) is True


def test_the_lora_overlap_is_off_unless_asked_for():
    for argv, want in ((["serve"], "off"), (["serve", "--lora-overlap", "shrink"], "shrink"),
                       (["serve", "--lora-overlap", "delta"], "delta")):  # fmt: skip
        args = build_parser().parse_args(argv)
        values = {"lora_overlap": args.lora_overlap}
        assert serve_config.build(values).engine.lora_overlap == want


@pytest.mark.parametrize(("field", "value", "message"), [
    ("decode_step", "graphs", "decode_step must be one of"),
    ("prefill_rows", "static", "prefill_rows must be one of"),
    ("lora_overlap", True, "lora_overlap must be one of"),
    ("max_cuda_graph_batch", 0, "max_cuda_graph_batch must be >= 1"),
    ("max_cuda_graph_len", 0, "max_cuda_graph_len must be >= 1"),
])  # fmt: skip
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


def test_buckets_cover_every_batch_up_to_the_largest():
    assert default_sizes(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert default_sizes(12) == (1, 2, 4, 8, 12)
    assert default_sizes(1) == (1,)
