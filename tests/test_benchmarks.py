"""Benchmarks measure; these check that their records are complete and self-consistent."""

from deepfusion_core import PRESETS, count_params
from deepfusion_core.config import Kernels
from deepfusion_bench.checkpoint import bench_checkpoint
from deepfusion_bench.kernels import compare_kernels
from deepfusion_bench.memory import bench_memory


def test_bench_checkpoint_times_orbax_and_raw_io_of_the_same_bytes(tmp_path):
    r = bench_checkpoint("tiny-S", str(tmp_path), repeats=1)
    assert r["gb"] == round(count_params(PRESETS["tiny-S"]) * 4 / 1e9, 3)
    for key in ("orbax_save", "orbax_restore", "raw_write", "raw_write_cached", "raw_read",
                "orbax_default_save", "orbax_default_restore", "orbax_ocdbt_save",
                "orbax_ocdbt_restore"):
        assert r[f"{key}_gb_per_s"] > 0
    assert r["save_over_raw"] > 0 and r["restore_over_raw"] > 0
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


def test_bench_memory_compares_the_estimate_with_xla():
    r = bench_memory("tiny-S", batch=4, inputs_length=32, targets_length=8, dtype="float32")
    assert r["xla_gib"] > 0 and r["estimate_gib"] > 0
    assert 0.3 < r["estimate_over_xla"] < 3


def test_bench_kernels_finds_a_fast_kernel_equal_to_the_reference():
    r = compare_kernels("tiny-S", "float32", batch=2, inputs_length=16, targets_length=8,
                        kernels=Kernels(attention="xla", loss_chunk=3))
    assert r["finite"] and r["attention"] == "xla" and r["loss_chunk"] == 3
    assert max(r["loss_rel_diff"], r["grad_norm_rel_diff"], r["params_rel_diff"]) < 1e-5
