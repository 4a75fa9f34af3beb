"""`--moe-kernel auto`: the kernel is chosen by timing each candidate on the run's shapes
(ops/moe/choose.py). That every candidate computes the same layer as the float64 reference is
tested in test_moe.py (buffers, batched, ragged on 1, 2x2 and ep-tp meshes)."""

import json

from moejax.config.model import load_config
from moejax.models.runspec import RunSpec
from moejax.ops.moe import choose
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout


def _rs(**kw):
    shape = parse_mesh("1x1x2x2")
    return RunSpec(load_config("configs/tiny.yaml"), load_layout("meshes/seed.yaml"), shape, **kw), make_mesh(shape)


def test_auto_times_every_candidate_picks_the_fastest_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    rs, mesh = _rs()
    chosen, choice = choose.choose_kernel(rs, mesh, (16, 100), repeats=3)
    assert set(choice["ms"]) == set(choose.CANDIDATES["cpu"])
    assert choice["tokens"] == [16, 128] and not choice["cached"]
    slow = [sum(t) for t in choice["ms"].values()]
    assert all(len(t) == 2 and min(t) > 0 for t in choice["ms"].values())
    best = [min(t[i] for t in choice["ms"].values()) for i in range(2)]
    score = {k: sum(a / b for a, b in zip(t, best)) for k, t in choice["ms"].items()}
    assert chosen.moe_kernel == chosen.kernel == choice["kernel"] == min(score, key=score.get), (slow, score)
    saved = json.load(open(tmp_path / "kernels.json"))
    assert [v["kernel"] for v in saved.values()] == [choice["kernel"]]
    again, second = choose.choose_kernel(rs, mesh, (9, 128), repeats=3)  # same powers of two: read, not timed
    assert second["cached"] and second["ms"] == choice["ms"] and again.kernel == choice["kernel"]


def test_a_named_kernel_is_kept_and_int8_keeps_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    rs, mesh = _rs(moe_kernel="buffers")
    assert choose.choose_kernel(rs, mesh, (16,))[0] is rs
    rs, mesh = _rs(quant="int8")
    chosen, choice = choose.choose_kernel(rs, mesh, (16,))
    assert chosen.moe_kernel == "buffers" and "int8" in choice["why"]
    assert not (tmp_path / "kernels.json").exists()
