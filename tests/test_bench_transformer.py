"""`rnncap bench --size tiny-transformer`: the Transformer against its PyTorch twin,
end to end (same first loss, same greedy captions from both caching decoders), the
FLOP count, the memory probe."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rnncap.bench import measure, transformer, workloads
from rnncap.cli import main
from rnncap.models.model import _shards


def test_step_flops_counts_the_matmuls():
    # every size 1, one layer: forward self QKV 6, scores+sum 4, out 2; cross q 2,
    # memory kv 4, scores+sum 4, out 2; FFN 4; vocab 2 -> 30; x3 with the backward,
    # plus the memory projection's forward and weight gradient (2 + 2).
    ones = dict(T=1, L=1, D=1, E=1, F=1, V=1, heads=1, layers=1)
    assert workloads.step_flops(1, ones) == 3 * 30 + 4
    big = workloads.SIZES["transformer"]
    assert workloads.step_flops(128, big) == 64 * workloads.step_flops(2, big)


def test_bench_transformer_against_its_torch_twin(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "tiny-transformer", "--quick", "--batch-sizes", "3,40", "--repeats", "2",
                 "--warmup", "1", "--parts", "train,decode", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "ratio rnncap/torch" in text and "greedy ratio" in text
    r = json.loads(out.read_text())
    # the header counts the Transformer's shards (at least 16 rows each), not the LSTM's (64)
    assert r["rnncap_shards"]["40"] == len(_shards(40, np, 16)) and r["dims"]["heads"] == 2
    for t in r["train"]:
        assert t["first_loss"]["torch"] == pytest.approx(t["first_loss"]["rnncap"], rel=1e-5)
        assert t["ratio"] > 0
    for d in r["decode"]:
        assert d["greedy_token_agreement"] == 1.0 and d["greedy_ratio"] > 0
        assert "torch beam" not in d and d["rnncap beam"]["captions_per_s"] > 0
    assert measure.memory_probe("torch", 3, "tiny-transformer")["peak_growth_bytes"] >= 0
    assert transformer.shard_rows(workloads.SIZES["coco"], 64) == 64
